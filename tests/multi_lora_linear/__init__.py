"""The multi-adapter op's tests: multi_lora_linear, add_multi_lora_ and AdapterBatch, one file per subject.

test_forward_backward.py   forward and every gradient against the per-row float64 reference; AdapterBatch
test_add.py                add_multi_lora_, the LoRA term added in place into an existing output
test_errors.py             bad input: clear errors; with the id check off, out-of-range ids mean no adapter
test_malformed_metadata_and_unusual_tensors.py
                           unchecked ranks, overlapping outputs, meta tensors
test_tile_map.py           the Triton kernels' tile map, K-splits, malformed metadata read as torch does
test_compile.py            torch.compile, opcheck and the profiler

The module (MultiLoRALinear) is tested in tests/test_modules.py. Concerns shared by both ops have their own
files in tests/ and cover this op too: non-finite values, host syncs, second derivatives, the C++
extension, tensor and data parallelism, kernel edge cases, GPU-only checks (test_gpu.py, test_gpu_hazards.py).
"""
