"""Build for flash_attn: the CUDA extensions `flash_attn_2_cuda` (exact attention) and
`flash_attn_linear_cuda` (linear attention, csrc/linear_attn) plus the Python package.

Environment flags (all optional):
  MAX_JOBS                         parallel nvcc jobs (default: from cores and RAM)
  NVCC_THREADS                     nvcc --threads per job (default 2)
  FLASH_ATTN_CUDA_ARCHS            e.g. "80;90" or "90" (default: the archs of the visible
                                   GPUs, else "80;90")
  FLASH_ATTENTION_SKIP_CUDA_BUILD  TRUE: pure-Python install (also automatic when
                                   torch has no CUDA or nvcc is missing)
  FLASH_ATTN_HEADDIMS              trim: e.g. "64,128" (default: all compiled head dims)
  FLASH_ATTN_DTYPES                trim: "fp16", "bf16" or "fp16,bf16" (default)
  FLASH_ATTN_DISABLE_ALIBI=1       trim: no ALiBi kernels
  FLASH_ATTN_DISABLE_SOFTCAP=1     trim: no softcap kernels
  FLASH_ATTN_DISABLE_DROPOUT=1     trim: no dropout kernels
  FLASH_ATTN_DISABLE_PAGEDKV=1     trim: no paged-KV kernels (block_table then raises on CUDA)
  FLASH_ATTN_DISABLE_SPLITKV=1     trim: no split-KV kernels (flash_attn_with_kvcache then
                                   ignores num_splits and runs unsplit)
  FLASH_ATTN_DISABLE_BACKWARD=1    trim: forward kernels only
  FLASH_ATTN_DISABLE_LINEAR=1      skip the linear-attention extension (flash_attn_linear_cuda)
  FLASH_ATTN_SM90_MMA_SYNC_BWD=1   also build the mma.sync backward kernels as sm90 code, where the
                                   wgmma ones replace them (every backward head dim):
                                   FLASH_ATTN_BWD_SM90=0 then runs them on sm90, for A/B
                                   timings and tests of the sm80 kernels on an H100 (default off:
                                   they cost ~25% of a full sm90 build)
  CUTLASS_HOME                     CUTLASS checkout (else the nvidia-cutlass package)

The built configuration is written to flash_attn/_build_config.json and read at
run time by flash_attn.build_info; GPU tests skip what was not compiled.
"""
import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
PACKAGE_VERSION = "2.8.3"  # the flash-attn API level this package implements
ALL_HEADDIMS = (32, 64, 96, 128, 192, 256)
ALL_DTYPES = ("fp16", "bf16")
# "splitkv", "paged" and "paged_splitkv" exist for head dims 64, 128, 256 only (generate_kernels.py).
ALL_VARIANTS = ("plain", "alibi", "softcap", "alibi_softcap", "dropout", "splitkv", "paged", "paged_splitkv")
MIN_TORCH = (2, 4)


def _env_flag(name):
    return os.environ.get(name, "").strip().upper() in ("1", "TRUE", "ON", "YES")


def _parse_list(name, default, cast=str):
    raw = os.environ.get(name, "").replace(";", ",").strip()
    if not raw:
        return list(default)
    return [cast(x.strip()) for x in raw.split(",") if x.strip()]


def _cutlass_include():
    home = os.environ.get("CUTLASS_HOME")
    if home:
        inc = Path(home) / "include"
        if not (inc / "cute" / "tensor.hpp").exists():
            sys.exit(f"CUTLASS_HOME={home} has no include/cute/tensor.hpp")
        return str(inc)
    # Found without importing: cutlass_library's __init__ pulls in heavy modules.
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("CUTLASS headers not found: `pip install nvidia-cutlass==4.2.0.0` "
                 "or set CUTLASS_HOME to a CUTLASS checkout")
    inc = Path(spec.submodule_search_locations[0]) / "source" / "include"
    if not (inc / "cute" / "tensor.hpp").exists():
        sys.exit(f"nvidia-cutlass is installed but {inc} has no cute/tensor.hpp")
    return str(inc)


def _skip_reason():
    """Why the CUDA extension is not built, or None when it is."""
    if _env_flag("FLASH_ATTENTION_SKIP_CUDA_BUILD"):
        return "FLASH_ATTENTION_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _check_torch():
    try:
        import torch
    except ImportError:
        sys.exit("flash_attn needs torch >= 2.4 installed first "
                 "(pip install --no-build-isolation expects it in the environment)")
    ver = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if ver < MIN_TORCH:
        sys.exit(f"flash_attn needs torch >= 2.4 (for torch.library.custom_op); found {torch.__version__}")
    return torch


def _default_max_jobs():
    cpus = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8
    # Each nvcc job of these kernels peaks near 3 GB with two archs.
    return max(1, min(cpus, int(mem_gb // 3)))


def _visible_gpu_archs():
    """The archs of the GPUs this build machine sees (sm80 SASS also serves sm86/sm89), or
    None when there is none or one outside 8.x / 9.0. As torch's cpp_extension does without
    TORCH_CUDA_ARCH_LIST: building on the GPU machine compiles for that GPU only, which keeps
    the full default build (every head dim, dtype and variant) inside 10 minutes on 16 cores
    (421 s for sm90 on an H100 host, commit 08cf671; both archs take about twice that)."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        majors = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # noqa: BLE001 - any failure to query means: use the portable default
        return None
    archs = set()
    for major, minor in majors:
        if major == 8:
            archs.add("80")
        elif (major, minor) == (9, 0):
            archs.add("90")
        else:
            return None
    return tuple(sorted(archs)) or None


def _archs():
    default = ("80", "90")
    if not os.environ.get("FLASH_ATTN_CUDA_ARCHS", "").strip():
        visible = _visible_gpu_archs()
        if visible:
            print(f"flash_attn: FLASH_ATTN_CUDA_ARCHS unset, building for the visible GPUs: {';'.join(visible)}")
            default = visible
    archs = _parse_list("FLASH_ATTN_CUDA_ARCHS", default)
    for a in archs:
        if a not in ("80", "86", "89", "90", "100", "120"):
            sys.exit(f"FLASH_ATTN_CUDA_ARCHS: unsupported arch {a!r} (expected e.g. '80;90')")
    return archs


def _kernel_selection():
    hdims = _parse_list("FLASH_ATTN_HEADDIMS", ALL_HEADDIMS, int)
    dtypes = _parse_list("FLASH_ATTN_DTYPES", ALL_DTYPES)
    bad = [d for d in hdims if d not in ALL_HEADDIMS]
    if bad:
        sys.exit(f"FLASH_ATTN_HEADDIMS: {bad} not among compiled head dims {ALL_HEADDIMS}")
    bad = [d for d in dtypes if d not in ALL_DTYPES]
    if bad:
        sys.exit(f"FLASH_ATTN_DTYPES: {bad} not among {ALL_DTYPES}")
    variants = [v for v in ALL_VARIANTS
                if not ("alibi" in v and _env_flag("FLASH_ATTN_DISABLE_ALIBI"))
                and not ("softcap" in v and _env_flag("FLASH_ATTN_DISABLE_SOFTCAP"))
                and not (v == "dropout" and _env_flag("FLASH_ATTN_DISABLE_DROPOUT"))
                and not ("splitkv" in v and _env_flag("FLASH_ATTN_DISABLE_SPLITKV"))
                and not ("paged" in v and _env_flag("FLASH_ATTN_DISABLE_PAGEDKV"))]
    return sorted(hdims), dtypes, variants


def _write_build_config(config):
    path = ROOT / "flash_attn" / "_build_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")


def _cuda_extension(torch, archs, hdims, dtypes, variants):
    from torch.utils.cpp_extension import CUDAExtension

    inst_dir = ROOT / "csrc" / "flash_attn" / "instantiations"
    sources = ["csrc/flash_attn/flash_api.cpp"]
    backward = not _env_flag("FLASH_ATTN_DISABLE_BACKWARD")
    for f in sorted(inst_dir.glob("flash_*.cu")):
        m = re.match(r"flash_(fwd|bwd)_hdim(\d+)_(fp16|bf16)_(\w+)_sm80\.cu$", f.name)
        if (m and int(m.group(2)) in hdims and m.group(3) in dtypes and m.group(4) in variants
                and (m.group(1) == "fwd" or backward)):
            sources.append(str(f.relative_to(ROOT)))
    if len(sources) == 1:
        sys.exit("no kernel instantiations selected: run csrc/flash_attn/generate_kernels.py "
                 "or widen FLASH_ATTN_HEADDIMS / FLASH_ATTN_DTYPES")

    # One macro per compiled slice, so the dispatch in flash_api.cpp references
    # only kernels that exist (a trimmed build raises a clear error instead of
    # failing to load on an undefined symbol).
    defines = [f"-DFLASH_ATTN_HAS_HDIM{d}" for d in hdims]
    defines += [f"-DFLASH_ATTN_HAS_{t.upper()}" for t in dtypes]
    if "alibi" in variants:
        defines.append("-DFLASH_ATTN_HAS_ALIBI")
    if "softcap" in variants:
        defines.append("-DFLASH_ATTN_HAS_SOFTCAP")
    if "dropout" in variants:
        defines.append("-DFLASH_ATTN_HAS_DROPOUT")
    if "splitkv" in variants:
        defines.append("-DFLASH_ATTN_HAS_SPLITKV")
    if "paged" in variants:
        defines.append("-DFLASH_ATTN_HAS_PAGEDKV")
    if backward:
        defines.append("-DFLASH_ATTN_HAS_BWD")
    if "90" in archs:
        defines.append("-DFLASH_ATTN_HAS_SM90A")  # the wgmma kernels exist (flash_api.cpp's routing)
        if _env_flag("FLASH_ATTN_SM90_MMA_SYNC_BWD"):
            defines.append("-DFLASH_ATTN_SM90_MMA_SYNC_BWD")

    # sm90 code is built as sm_90a: the backward's warpgroup MMAs (wgmma) exist only there.
    gencode = []
    for a in archs:
        a = "90a" if a == "90" else a
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    nvcc_threads = os.environ.get("NVCC_THREADS", "2")
    nvcc_flags = [
        "-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
        "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-DCUTLASS_ENABLE_TENSOR_CORE_MMA=1",
        "--threads", nvcc_threads,
    ] + gencode + defines
    include_dirs = [str(ROOT / "csrc" / "flash_attn"), str(ROOT / "csrc" / "common"), _cutlass_include()]
    return CUDAExtension(
        name="flash_attn_2_cuda",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": ["-O3", "-std=c++20"] + defines, "nvcc": nvcc_flags},
    )


def _backward_head_dims(sources):
    """The head dims of the backward kernels among the extension's sources (generate_kernels.py's
    BWD_HEAD_DIMS within FLASH_ATTN_HEADDIMS; none with FLASH_ATTN_DISABLE_BACKWARD). The
    extension runs every other head dim's backward zero-padded to the next of these."""
    return sorted({int(m.group(1)) for f in sources if (m := re.search(r"flash_bwd_hdim(\d+)_", f))})


def _linear_extension(flash_ext):
    """flash_attn_linear_cuda: csrc/linear_attn's kernels (both dtypes, head dims 64/128/256)
    and its one binding, with the nvcc flags of flash_ext less its FLASH_ATTN_HAS_* defines."""
    from torch.utils.cpp_extension import CUDAExtension

    src = ROOT / "csrc" / "linear_attn"
    sources = ["csrc/linear_attn/linear_api.cpp"] + [
        str(f.relative_to(ROOT)) for f in sorted(src.glob("*.cu")) + sorted((src / "instantiations").glob("*.cu"))]
    # (FLASH_ATTN_HAS_SM90A stays: chunk_fused_fwd's wgmma kernel runs only in builds with sm_90a code)
    nvcc = [f for f in flash_ext.extra_compile_args["nvcc"]
            if not f.startswith("-DFLASH_ATTN_HAS_") or f == "-DFLASH_ATTN_HAS_SM90A"]
    cxx = ["-O3", "-std=c++20"] + (["-DFLASH_ATTN_HAS_SM90A"] if "-DFLASH_ATTN_HAS_SM90A" in nvcc else [])
    return CUDAExtension(
        name="flash_attn_linear_cuda",
        sources=sources,
        include_dirs=[str(src), str(ROOT / "csrc" / "common"), _cutlass_include()],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


def main():
    ext_modules, cmdclass = [], {}
    reason = _skip_reason()
    config = {"version": PACKAGE_VERSION, "cuda": False, "skip_reason": reason,
              "archs": [], "head_dims": [], "dtypes": [], "variants": [], "linear_attn": False}
    if reason is None:
        torch = _check_torch()
        from torch.utils.cpp_extension import BuildExtension
        archs = _archs()
        hdims, dtypes, variants = _kernel_selection()
        os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
        ext_modules.append(_cuda_extension(torch, archs, hdims, dtypes, variants))
        linear = not _env_flag("FLASH_ATTN_DISABLE_LINEAR")
        if linear:
            ext_modules.append(_linear_extension(ext_modules[0]))
        config["linear_attn"] = linear
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
        config.update(cuda=True, archs=archs, head_dims=hdims, dtypes=dtypes, variants=variants,
                      backward_head_dims=_backward_head_dims(ext_modules[0].sources),
                      sm90_mma_sync_bwd="90" in archs and _env_flag("FLASH_ATTN_SM90_MMA_SYNC_BWD"),
                      torch_version=torch.__version__, cuda_version=torch.version.cuda)
        print(f"flash_attn: building CUDA kernels for sm{archs}, head dims {hdims}, "
              f"dtypes {dtypes}, variants {variants}, linear attention {'on' if linear else 'off'}, "
              f"MAX_JOBS={os.environ['MAX_JOBS']}")
    else:
        print(f"flash_attn: skipping the CUDA build ({reason}); installing the pure-Python "
              "package (CPU tensors run the reference implementation)")
    _write_build_config(config)

    setup(
        name="flash_attn",
        version=PACKAGE_VERSION,
        description="Exact and linear attention kernels for NVIDIA GPUs (flash-attn 2.x compatible API)",
        packages=find_packages(include=["flash_attn", "flash_attn.*"]),
        package_data={"flash_attn": ["_build_config.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "einops", "packaging"],
    )


if __name__ == "__main__":
    main()
