"""CUDA's autocast policy on CPU tensors, for the fake-tensor memory estimate.

A fake CUDA tensor cannot run backward without a GPU (the autograd engine asks the driver
for a device context), so the estimate runs on fake *CPU* tensors. CPU autocast, however,
casts fewer ops than CUDA autocast: under CUDA autocast ``group_norm``, ``layer_norm``,
``softmax``, ``exp``, ``pow``, the upsampling ops and the losses return float32, while
under CPU autocast they keep bfloat16. Activation memory depends on exactly that, so
`cuda_autocast` registers, for the duration of a ``with`` block, CPU-autocast kernels that
apply CUDA's policy:

- ``FP32``: floating inputs (not float64) are cast to float32;
- ``FP32_SET_OPT_DTYPE``: the op's ``dtype`` argument is set to float32 when not given;
- ``LOWER``: floating inputs are cast to the autocast dtype (ops CPU autocast lacks; the
  ones it has, ``linear``, ``conv2d``, ``matmul``, ``bmm``, ``addmm``, ``baddbmm`` and
  ``scaled_dot_product_attention``, keep CPU's own kernels, which cache the cast of a
  float32 parameter for the autocast region exactly as CUDA's do);
- ``PROMOTE``: floating inputs are cast to the widest floating dtype among them;
- CPU-only policies (float32 padding, 3-D pooling and the like) fall through: CUDA does
  not cast them.

The lists are those of ``ATen/autocast_mode.h`` (``AT_FORALL_LOWER_PRECISION_FP``,
``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``, ``AT_FORALL_PROMOTE``) of the installed
torch; ``tests/benchmarks/test_memory_estimate.py`` checks them against that header.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

# fmt: off
LOWER = (
    "_convolution", "_convolution.deprecated", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu",
    "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm",
    "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
    "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention",
    "scaled_dot_product_attention",
)
FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal",
    "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus",
    "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm",
    "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
    "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d",
    "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d",
    "_upsample_bicubic2d_aa",
)
FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
PROMOTE = (
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
    "tensordot", "scatter_add",
)
# Lower-precision ops whose CPU kernel already applies CUDA's policy (and the weight cache).
CPU_KEEPS = (
    "conv1d", "conv2d", "conv3d", "linear", "matmul", "mm", "bmm", "addmm", "addbmm", "baddbmm",
    "scaled_dot_product_attention", "prelu", "conv_tbc", "linalg_vecdot", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "_convolution.deprecated",
)
# fmt: on

_KEY = "AutocastCPU"


def _eligible(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64


def _cast_all(args: Any, dtype: torch.dtype) -> Any:
    return tree_map_only(
        torch.Tensor, lambda t: t.to(dtype) if _eligible(t) and t.dtype != dtype else t, args
    )


def _below_autocast(op: Any, args: Any, kwargs: Any) -> Any:
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return op(*args, **kwargs)


def _kernel(op: Any, policy: str) -> Callable[..., Any]:
    names = [a.name for a in op._schema.arguments]

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if policy == "fp32":
            args, kwargs = _cast_all((args, kwargs), torch.float32)
        elif policy == "lower":
            args, kwargs = _cast_all((args, kwargs), torch.get_autocast_dtype("cpu"))
        elif policy == "promote":
            floats = [
                t
                for t in tree_map_only(torch.Tensor, lambda t: t, list(args))
                if isinstance(t, torch.Tensor) and _eligible(t)
            ]
            if floats:
                widest = floats[0].dtype
                for t in floats[1:]:
                    widest = torch.promote_types(widest, t.dtype)
                args, kwargs = _cast_all((args, kwargs), widest)
        else:  # fp32_set_opt_dtype: output in float32 unless the caller chose a dtype
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None and _eligible(first):
                i = names.index("dtype")
                if i < len(args):
                    if args[i] is None:
                        args = (*args[:i], torch.float32, *args[i + 1 :])
                elif kwargs.get("dtype") is None:
                    kwargs = {**kwargs, "dtype": torch.float32}
        return _below_autocast(op, args, kwargs)

    return kernel


def _overload(name: str) -> Any:
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base)
    return getattr(packet, overload or "default")


def _cpu_only_ops() -> list[str]:
    """Ops with a CPU autocast kernel but none for CUDA: CUDA runs them in the input dtype."""
    cuda_listed = set(LOWER) | set(FP32) | set(FP32_SET_OPT_DTYPE) | set(PROMOTE)
    found = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::"):
            continue
        short = name[len("aten::") :]
        if short in cuda_listed or short.split(".")[0] in {"conv1d", "conv2d", "conv3d"}:
            continue  # conv*.padding decompose to _convolution, which CUDA casts
        if _KEY in torch._C._dispatch_dump(name):
            found.append(short)
    return found


@contextmanager
def cuda_policy() -> Iterator[None]:
    """Inside this block, ``torch.autocast("cpu", ...)`` casts as ``torch.autocast("cuda", ...)`` does.

    Example::

        with cuda_policy(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.group_norm(x_bf16, 8)  # float32, as on a GPU
    """
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for policy, names in (
                ("lower", LOWER),
                ("fp32", FP32),
                ("set_dtype", FP32_SET_OPT_DTYPE),
                ("promote", PROMOTE),
            ):
                for name in names:
                    if policy == "lower" and name in CPU_KEEPS:
                        continue
                    lib.impl(name, _kernel(_overload(name), policy), _KEY)
            for name in _cpu_only_ops():
                lib.impl(name, torch.library.fallthrough_kernel, _KEY)
        yield
    finally:
        lib._destroy()
