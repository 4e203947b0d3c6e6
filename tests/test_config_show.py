"""``blockdiff config show``: the schema listing (every section and field, type, default, description)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from blockdiff.cli.main import main
from blockdiff.config.schema import SECTIONS, Config, demo_config_path, load_config
from blockdiff.config.show import describe, render, type_name


def show(capsys, *args) -> tuple[int, str, str]:
    rc = main(["config", "show", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_field_has_a_description_and_the_listing_covers_the_schema(capsys):
    schema = {(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    entries = describe()
    assert [(e["section"], e["field"]) for e in entries] == [
        (s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    missing = [f"{e['section']}.{e['field']}" for e in entries if not e["help"].strip()]
    assert not missing, f"fields without a description: {missing}"
    assert all("\n" not in e["help"] for e in entries)

    rc, out, _ = show(capsys)
    assert rc == 0
    listed = yaml.safe_load(out)  # the listing is itself a YAML config at the defaults
    assert {(s, f) for s, body in listed.items() for f in body} == schema
    assert listed == Config().to_dict()
    for e in entries:  # each field's line carries its type and description
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {e['field']}: ") and e["help"] in ln)
        assert f"# {e['type']}; " in line


def test_types_read_as_yaml_types():
    assert type_name(int | None) == "int | null"
    by_name = {f"{e['section']}.{e['field']}": e["type"] for e in describe()}
    assert by_name["model.attn_backend"] == "auto|sdpa|flex"
    assert by_name["optimizer.betas"] == "[float, float]"
    assert by_name["lora.targets"] == "list[str]"
    assert by_name["model.from_config"] == "mapping | null"
    assert by_name["train.nan_policy"] == "skip|stop"


def test_with_a_file_it_shows_the_loaded_values_and_marks_the_changed_ones(capsys):
    rc, out, _ = show(capsys, "-c", demo_config_path(), "--optimizer.lr", "0.01")
    assert rc == 0
    cfg = load_config(demo_config_path(), ["--optimizer.lr", "0.01"])
    assert yaml.safe_load(out) == cfg.to_dict()
    lines = {ln.split(":")[0].strip(): ln for ln in out.splitlines() if ln.startswith("  ")}
    assert "# * float;" in lines["lr"] and "[default: 0.00015]" in lines["lr"]
    assert "# *" not in lines["attn_backend"]  # the demo leaves it at its default
    rc, out, _ = show(capsys, "-c", demo_config_path(), "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert len(rows) == len(describe())
    assert rows["model.dtype"]["changed"] and rows["model.dtype"]["value"] == "float32"
    assert rows["model.dtype"]["default"] == "bfloat16" and not rows["model.attn_backend"]["changed"]
    assert rows["optimizer.betas"]["value"] == [0.95, 0.99]


def test_a_bad_value_is_the_usual_one_line_error(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  train_path: x.jsonl\n  num_workers: 2\n")
    rc, out, err = show(capsys, "-c", str(p))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"blockdiff config: error: {p}:3")
    assert "'data.num_workers'" in err and "unknown field 'num_workers' in section 'data'" in err
    rc, _, err = show(capsys, "-c", demo_config_path(), "--optimizer.lr", "fast")
    assert rc == 2 and "--optimizer.lr: expected a number, got string 'fast'" in err
    rc, _, err = main(["config", "list"]), *capsys.readouterr()
    assert rc == 2 and "expected: blockdiff config show" in err


def test_train_help_points_to_config_show(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    assert "blockdiff config show" in capsys.readouterr().out


def test_render_marks_required_fields():
    text = render(describe(), None)
    assert "(required)" in next(ln for ln in text.splitlines() if ln.startswith("  train_path:"))
    assert "(required)" in next(ln for ln in text.splitlines() if ln.startswith("  output_dir:"))
