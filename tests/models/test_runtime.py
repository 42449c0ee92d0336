"""models.runtime.resolve_device: the one device rule of train, distil, infer-scene, evaluate and serve."""

import pytest
import torch

from aerialseg.core.errors import AerialsegError
from aerialseg.models.runtime import resolve_device

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallbacks")


@needs_no_cuda
def test_auto_is_the_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_one_line_error_with_the_callers_fix(name):
    with pytest.raises(AerialsegError, match="CUDA requested but not available — fix: set train.device"):
        resolve_device(name, 0, "params.yaml", "set train.device: auto or cpu")
    with pytest.raises(AerialsegError, match="fix: use --device cpu or auto"):
        resolve_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_is_this_ranks_gpu_in_training_and_plain_cuda_in_inference():
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda:0")
    assert resolve_device("auto") == torch.device("cuda")


def test_an_unknown_device_is_a_one_line_error():
    with pytest.raises(AerialsegError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
