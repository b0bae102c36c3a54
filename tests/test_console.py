"""The console's progress rows, folded from the flow's task-run log records."""

from __future__ import annotations

from bladeflow.app.console import Progress, stage_times
from bladeflow.core.contract import StageResult
from bladeflow.core.outcome import Status


def test_records_become_stage_and_candidate_rows():
    # setup
    p = Progress()
    events = [
        ("convert", "convert-1a2", "convert: onnx model m.onnx -> ONNX"),
        ("convert", "convert-1a2", "Finished in state Completed()"),
        ("build-candidate", "build-fused", "Finished in state Completed()"),
        ("build-candidate", "build-int8", "Finished in state Failed('boom')"),
        ("validate", "validate-fused", "validate: fused passed"),
        ("validate", "validate-fused", "Finished in state Completed()"),
        ("validate", "validate-base", "validate: base FAILED (output 'y': 3/3 samples outside)"),
        ("validate", "validate-base", "Finished in state Completed()"),
        ("register", "register-9f", "register: models:/m/1 is version 1"),
    ]
    # execute
    for task, run, message in events:
        p.event(task, run, message)
    p.finish()
    # assert
    assert p.stages["convert"].state == "done" and p.stages["optimize"].state == "done"
    assert p.stages["benchmark"].state == "waiting"
    assert p.candidates["fused"].state == "passed"
    assert p.candidates["int8"].state == "FAILED"
    assert p.candidates["base"].state == "rejected" and "3/3" in p.candidates["base"].note
    assert "build-int8: FAILED" in p.lines and "validate: fused passed" in p.lines


def test_where_the_time_went_lists_every_stage():
    # setup
    stages = [
        StageResult(stage="convert", status=Status.OK, elapsed_s=1.25),
        StageResult(stage="register", status=Status.SKIPPED, elapsed_s=0.0),
    ]
    # execute / assert
    assert stage_times(stages) == "where the time went: convert 1.2 s, register 0.0 s"


def test_a_twin_gets_its_verdict_row_from_its_own_validate_task():
    # setup: the twin check runs as a "validate" task named after the twin
    p = Progress()
    p.event("build-candidate", "build-fused-tuned", "Finished in state Completed()")
    # execute
    p.event(
        "validate",
        "validate-fused-tuned",
        "validate: fused-tuned passed, as fused: the same graph under other thread settings, "
        "outputs bitwise equal on 48 samples",
    )
    p.event("validate", "validate-fused-tuned", "Finished in state Completed()")
    # assert: shown as passed, not left at "built"
    assert p.candidates["fused-tuned"].state == "passed"


def test_a_recovered_candidate_shows_what_recovery_kept_until_its_verdict(tmp_path):
    # setup: the build summary as build_candidate_task logs it, from the pass's details
    import json

    from bladeflow.flows.stages import precision_note

    folder = tmp_path / "fused-int8-recovered" / "01-mixed_precision"
    folder.mkdir(parents=True)
    details = {"precision": "int8_dynamic", "passed_gate": True, "candidate_nodes": 25}
    details |= {"fp32_nodes": ["a", "b"], "tokenwise_nodes": ["c"] * 9}
    (folder / "pass_config.json").write_text(json.dumps({"details": details}))
    note = precision_note(tmp_path / "fused-int8-recovered")
    p = Progress()
    # execute
    p.event("build-candidate", "build-fused-int8-recovered", f"optimize: built x: {note}")
    p.event("validate", "validate-fused-int8-recovered", "validate: fused-int8-recovered passed")
    # assert
    assert note == "int8_dynamic: 2/25 nodes kept fp32, 9 token-wise int8"
    row = p.candidates["fused-int8-recovered"]
    assert row.state == "passed" and row.note == note
    assert precision_note(tmp_path / "no-such-recipe") is None
    details["passed_gate"] = False  # recovery missed its own aim (inside the gate): said, mildly
    (folder / "pass_config.json").write_text(json.dumps({"details": details}))
    assert precision_note(tmp_path / "fused-int8-recovered") == (
        f"{note}, short of recovery's margin"
    )
