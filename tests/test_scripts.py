"""The report and SVD-demo scripts on real runs."""

from conftest import ROOT, SLICE, assert_one_line_error, run, script


def test_report_writes_figures_and_markdown(finetuned, pretrained, outputs, tmp_path):
    sweep = tmp_path / "sweep"
    for i, method in enumerate(["lora", "full"]):
        run([*SLICE, "stage=finetune", "trainer.max_steps=3", f"base={pretrained[1]}", f"finetune.method={method}"], sweep, f"{i}_{method}")
    done = script(ROOT / "scripts" / "report.py", sweep)
    assert done.returncode == 0, done.stderr
    report = sweep / "report"
    for name in ("per_digit.png", "tradeoff.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (report / "report.md").read_text()
    assert "| 0_lora | ok | lora | 1 |" in text and "| 1_full | ok | full |" in text and "![tradeoff](tradeoff.png)" in text
    assert list(report.glob("events.out.tfevents.*"))
    missing = script(ROOT / "scripts" / "report.py", tmp_path / "nothing")
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")


def test_svd_demo(finetuned, pretrained, outputs, tmp_path):
    _, full_dir = run([*SLICE, "stage=finetune", "trainer.max_steps=3", f"base={pretrained[1]}", "finetune.method=full"], tmp_path, "full")
    out = tmp_path / "svd.png"
    done = script(ROOT / "scripts" / "svd_demo.py", "--full", full_dir, "--adapter", finetuned[1], "--out", out)
    assert done.returncode == 0, done.stderr
    assert "numbers stored: 100 -> 40" in done.stdout and "max |y - y'|" in done.stdout
    assert "full linear2" in done.stdout and "LoRA linear1: 90 % of the update's energy lies in its top 1" in done.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_scripts_usage_error_is_one_line(tmp_path):
    for name, args, fragment in [("merge_adapter.py", [], "the following arguments are required: base, adapter, out"),
                                 ("combine_adapters.py", [tmp_path, tmp_path / "out", "--weights", "x"], "invalid float value: 'x'"),
                                 ("frontier.py", ["--budget"], "expected one argument"),
                                 ("svd_demo.py", ["--bogus"], "unrecognized arguments: --bogus")]:
        done = script(ROOT / "scripts" / name, *args)
        assert_one_line_error(done, fragment, f"see {name} --help")
        assert done.returncode == 2 and "usage:" not in done.stderr
