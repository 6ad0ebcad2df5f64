"""Ops of dylora_moe: the grouped MoE-LoRA matmul and the fused top-k router, in Triton and eager PyTorch.

Installed as ``dylora_moe.kernels`` (the repo folder ``kernels/``):
``from dylora_moe.kernels import moe_lora, topk_route``. It knows nothing of models.

Backends:
  - ``"triton"``: the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
  - ``"eager"``: vectorised PyTorch of the same math (the CPU path, the benchmark baseline, the test oracle).
  - ``"loop"``: for moe_lora a Python loop over experts, the way most MoE-LoRA code does it (benchmarks); for
    topk_route the eager router (one vocabulary for both ops).
  - ``"auto"``: triton for CUDA tensors, eager otherwise, decided from the tensors' device at each call.

Files: ops.py (the public ops: input checks and dispatch), dispatch.py (the Triton MoE-LoRA entry: path choice
and launch), paths.py (the registry of Triton MoE-LoRA paths: name, fit, cost, config, launcher), stacked.py /
stacked_kernels.py (all experts as one rank space), grouped.py / grouped_kernels.py (pairs sorted by expert),
topk_route.py (the fused top-k router), configs.py (every kernel's launch config), eager.py (the PyTorch twins),
grouped_mm.py (the MoE-LoRA on torch's grouped GEMM: the benchmarks' baseline, and the eager backend's form on
the CPU where it measured faster),
routing_meta.py (gate, counts and sort built once per step), _launch.py (launch point, the one op registration
helper), device.py (each target's limits: shared memory, registers, SMs, peaks), cost.py (bytes, FLOPs and
launches of each path: the roofline time), compile_report.py (every config compiled for sm_80..sm_120 on the CPU:
registers, spills, shared memory; ``python -m dylora_moe.kernels.compile_report``), provenance.py (the machine and
the commit a result came from).
"""

# This folder is the package `dylora_moe.kernels`, but whatever runs from the repository root (`python train.py`,
# `python -m pytest`, `python -c`, an interactive session) has the root on sys.path, so `import kernels` finds this
# folder before Hugging Face's `kernels` package (which transformers imports when a model class loads). Imported
# under that bare name, this module steps aside: it loads the next `kernels` on sys.path in its own place (the
# import system returns whatever sys.modules holds when this file finishes), or, when there is none, leaves an
# empty namespace package, which is what Python makes of a bare folder and what transformers reads as "not
# installed". Only the standard library runs on that path.
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _holds_this_folder(entry: str) -> bool:
        candidate = os.path.join(entry or os.curdir, "kernels", "__init__.py")
        return os.path.exists(candidate) and os.path.samefile(candidate, __file__)

    _spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if not _holds_this_folder(p)])
    if _spec is None:
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    if _spec.loader is not None:
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules["kernels"]
            raise
else:
    from ._launch import resolve_backend
    from .ops import RouteResult, moe_lora, topk_route
    from .routing_meta import RoutingMeta, dense_gate

    __all__ = ["moe_lora", "topk_route", "RouteResult", "RoutingMeta", "resolve_backend", "dense_gate"]
