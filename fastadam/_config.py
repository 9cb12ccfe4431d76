"""``fastadam.show_config()`` / ``python -m fastadam --info``: what this installation has."""
import os
import sys

from . import __version__, _backends, _threads


def _openmp_runtimes():
    """Paths of the OpenMP runtimes mapped into this process (Linux)."""
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.rstrip().count(" ") >= 5 else ""
                name = os.path.basename(path)
                if any(k in name for k in ("libgomp", "libomp", "libiomp")) and path not in found:
                    found.append(path)
    except OSError:
        pass
    return found


def config():
    """The configuration as a dict."""
    info = {"version": __version__, "python": sys.version.split()[0],
            "backends": {name: (reason or "available") for name, reason in _backends.available().items()},
            "cpus_usable": _threads.cpu_limit(), "cgroup_cpu_quota": _threads.cgroup_cpu_quota(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        kernel = _backends._load_cython()
    except ImportError:
        return info
    info.update({
        "kernel_variants_compiled": list(kernel.ISA_NAMES),
        "kernel_variants_supported": [i for i in kernel.ISA_NAMES if kernel.isa_supported(i)],
        "kernel_variant_in_use": kernel.isa_in_use(), "FASTADAM_ISA": os.environ.get("FASTADAM_ISA"),
        "sve_vector_bits": kernel.sve_vector_bits(),
        "flush_to_zero_in_hardware": kernel.FLUSH_TO_ZERO_IN_HARDWARE,
        "openmp": kernel.OPENMP_ENABLED, "openmp_runtimes": _openmp_runtimes(),
        "default_num_threads": kernel.default_num_threads(),
        "parallel_threshold_elements": kernel.parallel_threshold(),
    })
    return info


def show_config(file=None):
    """Print the version, backends, kernel variants, OpenMP and thread defaults."""
    file = file or sys.stdout
    info = config()
    print(f"fastadam {info['version']} (Python {info['python']})", file=file)
    for name, status in info["backends"].items():
        print(f"  backend {name:7s} {status}", file=file)
    auto = next((n for n in _backends.BACKENDS if info["backends"][n] == "available"), None)
    print(f"  backend='auto' uses {auto}" + ("" if auto == _backends.BACKENDS[0] else
          " (the compiled kernel is not available: see its line above)"), file=file)
    if "kernel_variant_in_use" in info:
        print(f"  kernel variants: compiled {', '.join(info['kernel_variants_compiled'])}; "
              f"supported here {', '.join(info['kernel_variants_supported'])}; "
              f"in use {info['kernel_variant_in_use']}"
              + (f" ({info['sve_vector_bits']}-bit vectors)" if info["kernel_variant_in_use"] == "sve" else "")
              + (" (forced by FASTADAM_ISA)" if info["FASTADAM_ISA"] else ""), file=file)
        if not info["flush_to_zero_in_hardware"]:
            print("  flush-to-zero: not available on this architecture (results can differ from the "
                  "reference's where values are subnormal)", file=file)
        if info["openmp"]:
            print(f"  OpenMP: on ({', '.join(info['openmp_runtimes']) or 'runtime not found in maps'})",
                  file=file)
        else:
            print("  OpenMP: OFF (built without it: FASTADAM_OPENMP=0, or a compiler without OpenMP): "
                  "every step runs on one thread",
                  file=file)
        print(f"  default threads: {info['default_num_threads']} (usable CPUs {info['cpus_usable']}, "
              f"cgroup quota {info['cgroup_cpu_quota']}, OMP_NUM_THREADS {info['OMP_NUM_THREADS']}); "
              f"one thread below {info['parallel_threshold_elements']} elements per step", file=file)
    return info
