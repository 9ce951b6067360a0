"""adgen.run_dirs: the one check of a directory a job owns (training, evaluation and the Ray catalog use it)."""

from __future__ import annotations

import json

import pytest

from adgen.errors import AdgenError
from adgen.run_dirs import RunDirectory, RunDirMessages

JOB = RunDirectory(
    owned=("state.json", "result.json", "parts/part-*"),
    markers=("state.json", "result.json"),
    manifest="state.json",
    settings_key="settings",
    resumable=("state.json",),
    messages=RunDirMessages(
        is_file="{path} is a file",
        foreign="{path} is not a job's directory",
        other_settings="{path} holds another run ({diff})",
        unreadable="{path}: state unreadable",
        finished="{path} holds a finished run ({found})",
        leftovers="{path} also holds {leftovers}",
    ),
)


def _claimed(tmp_path, settings):
    run = tmp_path / "run"
    assert JOB.prepare(run, settings) is False  # nothing there: a fresh run
    run.mkdir()
    JOB.claim(run, settings, started="now")
    return run


def test_a_run_of_the_same_settings_resumes_and_other_settings_are_named(tmp_path):
    run = _claimed(tmp_path, {"model": "a", "decoding": {"max_new_tokens": 8}})
    assert json.loads((run / "state.json").read_text()) == {"settings": {"model": "a", "decoding": {"max_new_tokens": 8}},
                                                            "started": "now"}
    assert JOB.prepare(run, {"model": "a", "decoding": {"max_new_tokens": 8}}) is True
    with pytest.raises(AdgenError, match=r"holds another run \(decoding.max_new_tokens: 8 -> 16\)"):
        JOB.prepare(run, {"model": "a", "decoding": {"max_new_tokens": 16}})
    (run / "state.json").write_text("{not json")
    with pytest.raises(AdgenError, match="state unreadable"):
        JOB.prepare(run, {"model": "a"})


def test_refusals_file_foreign_finished_and_leftovers(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(AdgenError, match="is a file"):
        JOB.prepare(tmp_path / "f", {})
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("x")
    for overwrite in (False, True):  # never written into, never deleted from
        with pytest.raises(AdgenError, match="not a job's directory"):
            JOB.prepare(other, {}, overwrite=overwrite)
    assert (other / "cat.jpg").exists()
    done = tmp_path / "done"
    done.mkdir()
    (done / "result.json").write_text("{}")
    with pytest.raises(AdgenError, match=r"finished run \(result.json\)"):
        JOB.prepare(done, {})
    (done / "notes.txt").write_text("mine")
    with pytest.raises(AdgenError, match="also holds notes.txt"):
        JOB.prepare(done, {}, overwrite=True)
    assert not (done / "result.json").exists() and (done / "notes.txt").exists()  # only the job's own went


def test_overwrite_deletes_only_the_jobs_files(tmp_path):
    run = _claimed(tmp_path, {"model": "a"})
    (run / "parts").mkdir()
    (run / "parts" / "part-0").write_text("x")
    (run / "parts" / "keep.txt").write_text("x")
    (run / "result.json").write_text("{}")
    lenient = RunDirectory(owned=JOB.owned, markers=JOB.markers, manifest=JOB.manifest, settings_key="settings",
                           resumable=JOB.resumable, messages=RunDirMessages(is_file="{path} is a file"))
    assert lenient.prepare(run, {"model": "b"}, overwrite=True) is False
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == ["parts", "parts/keep.txt"]
    assert lenient.prepare(run, {"model": "b"}) is False  # what is left is no run: a fresh start


def test_resume_asked_for_needs_the_directory(tmp_path):
    with pytest.raises(AdgenError, match="does not exist; nothing to resume"):
        JOB.prepare(tmp_path / "nowhere", resume=True)
    assert JOB.prepare(tmp_path, resume=True) is True


def test_a_catalog_run_can_be_overwritten(tmp_path):
    """The Ray catalog's directory: --overwrite of a finished run starts it afresh (its shards folder once made
    the old check take the emptied directory for someone else's)."""
    from adgen.generation.ray_catalog import _prepare_dir

    out = tmp_path / "out"
    _prepare_dir(out, {"records": 2}, overwrite=False)
    (out / "shards" / "part-00000.jsonl").write_text("{}\n")
    (out / "generated.jsonl").write_text("{}\n")
    _prepare_dir(out, {"records": 2}, overwrite=False)  # the same run: resumed
    with pytest.raises(AdgenError, match=r"another catalog or other settings \(differs in records: 2 -> 3\)"):
        _prepare_dir(out, {"records": 3}, overwrite=False)
    _prepare_dir(out, {"records": 3}, overwrite=True)
    assert json.loads((out / "catalog.json").read_text()) == {"records": 3}
    assert not (out / "generated.jsonl").exists() and list((out / "shards").iterdir()) == []
