import json, copy
from concurrent.futures import ProcessPoolExecutor
from dylora_moe.kernels import compile_report as C
v = C.collect_variants("sm_80", "full")
jobs = []
for x in v.values():
    cfg = C._split(x["kwargs"])["config"]; dt = C._dtype_of(x)
    if x["kernel"] == "_stacked_dy_kernel" and dt == "bfloat16" and cfg["BLOCK_N"] == 256 and cfg["BLOCK_D"] == 16:
        for st in (1, 2):
            y = copy.deepcopy(x); y["kwargs"]["num_stages"] = st; jobs.append(y)
    if x["kernel"] == "_stacked_weights_kernel" and dt == "bfloat16" and cfg["BLOCK_N"] == 256 and cfg["BLOCK_D"] == 32:
        y = copy.deepcopy(x); y["kwargs"]["BLOCK_D"] = 16; jobs.append(y)
    if x["kernel"] == "_topk_route_bwd_kernel" and dt == "bfloat16" and cfg["BLOCK_E"] == 32 and x["kwargs"]["K"] == 8:
        y = copy.deepcopy(x); y["kwargs"]["num_warps"] = 4; jobs.append(y)
    if x["kernel"] == "_topk_route_bwd_kernel" and dt == "bfloat16" and cfg["BLOCK_E"] == 64 and x["kwargs"]["K"] == 4:
        y = copy.deepcopy(x); y["kwargs"]["num_warps"] = 4; jobs.append(y)
with ProcessPoolExecutor(3) as pool:
    for x, r in zip(jobs, pool.map(C.compile_variant, [(p["module"], 80, p) for p in jobs])):
        print(x["kernel"], C._split(x["kwargs"])["config"], x["kwargs"].get("K"), r)
