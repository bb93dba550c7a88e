"""Pure ``@triton.jit`` code: no torch, no launch logic. Importing this module imports triton."""
