import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[2] / "bench" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_sections_replace_only_themselves(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    report.write_section("comp", "Compounding", "cpu figure 1", device="cpu", command="x", path=md)
    report.write_section("comp", "Compounding", "gpu figure", device="cuda", command="x", path=md)
    report.write_section("metrics", "Metrics", "table", command="y", path=md)
    report.write_section("comp", "Compounding", "cpu figure 2", device="cpu", command="x", path=md)
    text = md.read_text()
    assert "cpu figure 2" in text and "cpu figure 1" not in text
    assert "gpu figure" in text and "table" in text
    assert text.count("<!-- BEGIN comp:cpu -->") == 1
    assert text.index("comp:cpu") < text.index("comp:gpu") < text.index("metrics:cpu")


def test_markdown_table():
    assert report.markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
