"""tools/check_image_deps.py's reading of the Dockerfile and setup.py and its checks (the resolution
itself needs the package index: CI runs the tool before the suite, .ci/run)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import check_image_deps as C  # noqa: E402


def test_pins_and_requirements_come_from_the_dockerfile_and_setup():
    pins = C.dockerfile_pins()
    assert {"TORCH_VERSION", "VLLM_VERSION", "MCORE_VERSION", "TE_VERSION"} <= set(pins)
    extras = C.setup_extras()
    reqs = C.image_requirements(pins, extras)
    names = [C.name_of(r) for r in reqs]
    assert len(names) == len(set(names)), "a package required twice"
    assert f"vllm=={pins['VLLM_VERSION']}" in reqs and f"transformer-engine-cu13=={pins['TE_VERSION']}" in reqs
    assert "pytest" in names and "reasoning-gym" in names  # the gpu and test extras


def test_te_range_is_megatron_cores():
    mcore = ['transformer-engine[core_cu13,pytorch]<2.12.0,>=2.9.0a0; extra == "dev"', "torch>=2.6.0"]
    assert C.te_range_problem("2.11.0", mcore) == ""
    assert "outside megatron-core's declared range" in C.te_range_problem("2.20.2", mcore)
    assert "outside" in C.te_range_problem("2.8.0", mcore)
    assert C.te_range_problem(C.dockerfile_pins()["TE_VERSION"], mcore) == ""  # the image's pin


def test_culprits_named_in_pips_errors():
    out = ("ERROR: Cannot install reasoning-gym==0.1.24 and reasoning-gym==0.1.25 because these package versions have "
           "conflicting dependencies.\nERROR: No matching distribution found for cellpylib==2.4.0 (from reasoning_gym)")
    assert C.culprits(out) == ["reasoning-gym"]
