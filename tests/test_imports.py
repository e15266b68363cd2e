"""``import moecap`` (and its light modules) must not pull in heavy frameworks."""

import subprocess
import sys

HEAVY = ["torch", "transformers", "gradio", "vllm", "ray", "sglang"]


def test_import_moecap_is_light():
    code = (
        "import sys, moecap, moecap.suite, moecap.registry, moecap.records, moecap.report, moecap.cli, "
        "moecap.runners, moecap.runners.args, moecap.metrics, moecap.metrics.latency, "
        "moecap.metrics.utilization, moecap.metrics.accounting, moecap.leaderboard, moecap.hardware\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import moecap pulled in: {out}"


def test_suite_validation_is_light():
    """Validating and expanding a suite (incl. --dry-run) needs no framework either."""
    code = (
        "import sys\n"
        "from moecap.suite import load_suite, expand\n"
        "s = load_suite('quickstart'); expand(s)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_subpackages_map_to_design_folders():
    import moecap.leaderboard
    import moecap.metrics
    import moecap.runners

    for mod, folder in ((moecap.runners, "runners"), (moecap.metrics, "metrics"), (moecap.leaderboard, "leaderboard")):
        assert mod.__file__.replace("\\", "/").split("/")[-2] == folder
