"""Build of apl-repro: the pure-Python package `apl` and its fused loss operator `apl._C`.

The extension is built against the installed torch, so install torch first and build with
`pip install --no-build-isolation -e .` (scripts/setup_env.sh does both), or a wheel with
`python -m build --wheel --no-isolation`. The CPU kernels are always built; the CUDA kernels when
a CUDA toolkit is found and either a GPU is visible or FORCE_CUDA=1 (build-only machines, CI).
TORCH_CUDA_ARCH_LIST picks the GPU architectures (torch's default when unset); APL_NO_EXTENSION=1
skips the extension entirely. Beside the extension the build writes `apl/_C_build.json`, the torch
it was built against, which apl.losses.fused compares with the torch it runs on.

The loss library needs torch alone (requirements/torch.txt); the reproduction's dependencies are the
extra `repro`, the Ray engine's `ray`, the test tools' `test` (requirements/*.txt, the lists
scripts/setup_env.sh installs). The version is apl.__version__, read from apl/__init__.py.
"""
import ast
import glob
import json
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
#: The file beside the extension that names the torch it was built against (apl.losses.fused reads it).
BUILD_RECORD = "_C_build.json"


def _version() -> str:
    """``apl.__version__``, read from apl/__init__.py without importing the package."""
    with open(os.path.join(HERE, "apl", "__init__.py"), encoding="utf-8") as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
                return ast.literal_eval(node.value)
    raise RuntimeError("apl/__init__.py sets no __version__")


def _requirements(name: str) -> list[str]:
    """requirements/<name>.txt: one requirement a line, ``#`` comments."""
    with open(os.path.join(HERE, "requirements", f"{name}.txt"), encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def _recording(build_ext):
    """``build_ext`` that also writes :data:`BUILD_RECORD` beside each extension it builds."""

    class BuildAndRecord(build_ext):
        def run(self):
            super().run()
            import torch

            for ext in self.extensions:  # after run(): in place for an editable install, else the wheel's tree
                folder = os.path.dirname(self.get_ext_fullpath(ext.name))
                with open(os.path.join(folder, BUILD_RECORD), "w", encoding="utf-8") as f:
                    json.dump({"torch": torch.__version__}, f)
                    f.write("\n")

    return BuildAndRecord


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
    return [ext], {"build_ext": _recording(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _extensions()

setup(
    name="apl-repro",
    version=_version(),
    description="Robust losses under label noise (NCE, NFL, APL) as fused C++/CUDA operators, "
                "and a reproduction of an APL paper on CIFAR-10",
    packages=find_packages(include=["apl", "apl.*"]),
    package_data={"apl": ["paper_numbers.json", "successor_numbers.json"]},
    python_requires=">=3.10",
    install_requires=_requirements("torch"),
    extras_require={"repro": _requirements("repro"), "ray": _requirements("ray"),
                    "test": _requirements("test") + _requirements("ray")},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["apl=apl.__main__:main"]},
    zip_safe=False,
)
