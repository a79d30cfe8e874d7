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


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    def refusal(*argv: str) -> str:
        assert bench_commits.main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("bench_commits.py: error: ") and err.count("\n") == 1
        return err

    assert "'no-such-commit' is not a commit" in refusal("prepare", "no-such-commit", "--into", str(tmp_path / "t"))
    assert not (tmp_path / "t" / "order.txt").exists()  # nothing written for a refused list
    assert "cannot be read; run 'bench_commits.py prepare" in refusal("run", "--into", str(tmp_path / "none"))
    (tmp_path / "order.txt").write_text("")
    assert "lists no commits" in refusal("run", "--into", str(tmp_path))
    (tmp_path / "order.txt").write_text("abc1234\n")
    assert "lacks the trees of abc1234" in refusal("run", "--into", str(tmp_path))


def fake_tree(into: Path, sha: str, script: str) -> None:
    """A prepared tree whose bench_dpsgd.py is ``script`` (argv: ... --json PATH)."""
    (into / sha / "benchmarks").mkdir(parents=True)
    (into / sha / "benchmarks" / "bench_dpsgd.py").write_text(script)


def test_a_failing_commit_is_marked_and_the_others_still_run(tmp_path, capsys):
    write = ("import json, sys\njson.dump({'results': [{'workload': 'w', 'engine': 'e', 'dp': True, "
             "'ms_per_step': 2.5}]}, open(sys.argv[-1], 'w'))\n")
    fake_tree(tmp_path, "aaa1111", "raise SystemExit(3)\n")
    fake_tree(tmp_path, "bbb2222", write)
    (tmp_path / "order.txt").write_text("aaa1111\nbbb2222\n")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "aaa1111.json").write_text('{"results": [{"workload": "w", "engine": "e", "dp": true, "ms_per_step": 1}]}')
    assert bench_commits.main(["run", "--into", str(tmp_path), "--out", str(out), "--", "--x"]) == 1
    printed = capsys.readouterr().out
    assert "aaa1111: bench_dpsgd.py failed (exit status 3)" in printed
    assert "w e DP | failed | 2.50" in printed  # the stale JSON of an earlier run did not stand in
