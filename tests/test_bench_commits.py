"""benchmarks/bench_commits.py: each commit's tree as git has it, imported from there, and the side-by-side table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_commits  # noqa: E402

pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git repository")


def test_prepare_writes_each_commit_as_git_has_it_oldest_first(tmp_path):
    older, newer = bench_commits.git("rev-parse", "--short", "HEAD~1"), bench_commits.git("rev-parse", "--short", "HEAD")
    assert bench_commits.prepare(["HEAD", "HEAD~1"], tmp_path) == [older, newer]
    assert (tmp_path / "order.txt").read_text().split() == [older, newer]
    for sha in (older, newer):
        for name in ("src/dpvision/engines/fast.py", "benchmarks/bench_dpsgd.py"):
            shown = subprocess.run(["git", "-C", str(REPO), "show", f"{sha}:{name}"], capture_output=True, check=True)
            assert (tmp_path / sha / name).read_bytes() == shown.stdout


def test_each_run_imports_its_own_tree(tmp_path):
    tree = tmp_path / "abc1234"
    (tree / "src" / "dpvision").mkdir(parents=True)
    (tree / "src" / "dpvision" / "__init__.py").write_text("MARK = 'the prepared tree'\n")
    out = subprocess.run([sys.executable, "-c", "import dpvision; print(dpvision.MARK)"], env=bench_commits.tree_env(tree),
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.strip() == "the prepared tree"


def test_table_has_a_column_per_run_and_a_dash_where_a_row_is_missing():
    rows = [{"workload": "wrn16_4", "engine": "plain", "dp": False, "ms_per_step": 12.77},
            {"workload": "wrn16_4", "engine": "fast", "dp": True, "ms_per_step": 14.1}]
    text = bench_commits.table([("750b5b3", {"results": rows}),
                                ("1ae636b", {"results": [dict(rows[1], ms_per_step=19.51)]})])
    lines = text.splitlines()
    assert lines[0] == "ms per step | 750b5b3 | 1ae636b"
    assert "wrn16_4 plain non-DP | 12.77 | —" in lines
    assert "wrn16_4 fast DP | 14.10 | 19.51" in lines


def test_run_without_prepared_commits_says_so(tmp_path):
    (tmp_path / "order.txt").write_text("")
    with pytest.raises(SystemExit, match="lists no commits"):
        bench_commits.run(tmp_path, [], False, tmp_path / "out")
