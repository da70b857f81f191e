"""The pipeline language: text parses and prints back unchanged; errors point at the bad character."""

from __future__ import annotations

import pytest

from qcompile.passes import DEFAULT_PIPELINE, PASSES, parse_pipeline
from qcompile.passes.calibrate import Calibrate
from qcompile.passes.insert_quantizers import InsertQuantizers
from qcompile.passes.pipeline import PipelineSyntaxError


@pytest.mark.parametrize("text", [
    DEFAULT_PIPELINE,
    "fold-batchnorm,insert-quantizers{weights=4,acts=8},calibrate{steps=32},lower-integer",
    "calibrate{percentile=99.99,momentum=0.5}",
    "calibrate{momentum=0.5,percentile=99.99}",  # option order is kept
    "calibrate{percentile=none}",
    "calibrate{steps=032}",  # kept as written, even where the value normalises
    "assign-bitwidths{policy=table,table=some_dir/bits-1.json}",
    "insert-quantizers{scheme=uniform},share-scales,share-scales",
    "canonicalize",
])
def test_round_trip(text: str) -> None:
    assert str(parse_pipeline(text)) == text


def test_options_are_converted_to_their_types() -> None:
    text = "insert-quantizers{weights=4,acts=8},calibrate{steps=7,momentum=0.5,percentile=none}"
    passes = parse_pipeline(text).build()
    assert passes == [InsertQuantizers(weights=4, acts=8), Calibrate(steps=7, momentum=0.5, percentile=None)]
    (cal,) = parse_pipeline("calibrate{percentile=99.9}").build()
    assert isinstance(cal, Calibrate) and cal.percentile == 99.9 and isinstance(cal.steps, int)


def parse_error(text: str) -> PipelineSyntaxError:
    with pytest.raises(PipelineSyntaxError) as info:
        parse_pipeline(text)
    err = info.value
    assert f"at character {err.pos + 1}" in str(err)
    assert f"{text[:err.pos]}>>>{text[err.pos:]}" in str(err)  # the marker sits at the bad character
    return err


def test_unknown_pass_lists_the_known_ones() -> None:
    err = parse_error("canonicalize,frobnicate{x=1}")
    assert err.pos == len("canonicalize,")
    assert "unknown pass 'frobnicate'" in str(err)
    for name in PASSES:
        assert name in str(err)


def test_unknown_option_lists_the_options() -> None:
    err = parse_error("canonicalize,calibrate{steps=3,stepz=4}")
    assert err.pos == len("canonicalize,calibrate{steps=3,")
    assert "'calibrate' has no option 'stepz'" in str(err)
    assert "options: steps, momentum, percentile" in str(err)


def test_option_of_a_pass_without_options() -> None:
    err = parse_error("share-scales{fast=true}")
    assert err.pos == len("share-scales{")
    assert "options: none" in str(err)


@pytest.mark.parametrize(("text", "value", "kind"), [
    ("calibrate{steps=many}", "many", "int"),
    ("calibrate{steps=3.5}", "3.5", "int"),
    ("calibrate{momentum=fast}", "fast", "float"),
    ("calibrate{percentile=high}", "high", "float"),
    ("insert-quantizers{weights=none}", "none", "int"),
])
def test_bad_value_type(text: str, value: str, kind: str) -> None:
    err = parse_error(text)
    assert err.pos == text.index(value, text.index("="))
    assert f"must be {kind}" in str(err)


@pytest.mark.parametrize(("text", "pos", "message"), [
    ("calibrate{steps=3", len("calibrate{steps=3"), "expected ',' or '}'"),
    ("calibrate{steps=3,momentum=0.5", len("calibrate{steps=3,momentum=0.5"), "expected ',' or '}'"),
    ("calibrate{steps}", len("calibrate{steps"), "expected '='"),
    ("calibrate{steps=}", len("calibrate{steps="), "expected a value"),
    ("calibrate{}", len("calibrate{"), "expected an option name"),
])
def test_unterminated_or_malformed_options(text: str, pos: int, message: str) -> None:
    err = parse_error(text)
    assert err.pos == pos
    assert message in str(err)


@pytest.mark.parametrize(("text", "pos", "message"), [
    ("calibrate;lower-integer", len("calibrate"), "expected ',' between passes"),
    ("calibrate{steps=3}}", len("calibrate{steps=3}"), "expected ',' between passes"),
    ("calibrate lower-integer", len("calibrate"), "expected ',' between passes"),
    ("calibrate,,lower-integer", len("calibrate,"), "expected a pass name"),
    ("calibrate,", len("calibrate,"), "expected a pass name"),
    ("", 0, "expected a pass name"),
    ("Calibrate", 0, "expected a pass name"),
])
def test_trailing_garbage_and_missing_names(text: str, pos: int, message: str) -> None:
    err = parse_error(text)
    assert err.pos == pos
    assert message in str(err)


def test_syntax_errors_are_qcompile_errors() -> None:
    import qcompile

    assert issubclass(PipelineSyntaxError, qcompile.QCompileError)
