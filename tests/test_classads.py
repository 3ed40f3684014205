"""jobcage.classads over the real ClassAd library of the htcondor wheel (pure logic)."""

from __future__ import annotations

import sys

import pytest

from jobcage import classads
from jobcage.errors import ClassAdError, JobCageError, MissingExtraError


def test_the_library_of_the_wheel_is_found():
    assert classads.module().__name__ in classads.MODULE_NAMES


def test_missing_library_names_the_extra(monkeypatch):
    for name in classads.MODULE_NAMES:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    classads.module.cache_clear()
    try:
        with pytest.raises(MissingExtraError, match=r"pip install jobcage\[condor\]") as info:
            classads.module()
        assert isinstance(info.value, JobCageError)
    finally:
        classads.module.cache_clear()


def test_new_format_sequence_with_tricky_strings_and_comments():
    text = """
    // a transfer list
    [ Url = "nfs:/a/b]c:inst"; LocalFileName = "/s/x"; Note = "a \\" ] [ quote" ]
    /* between ads */
    [ Url = "cow:///a"; N = 1 + 2; L = { 1, [ x = 2 ] } ]
    """
    ads = classads.parse_ads(text)
    assert len(ads) == 2
    assert classads.evaluate(ads[0], "Url") == "nfs:/a/b]c:inst"
    assert classads.evaluate(ads[0], "note") == 'a " ] [ quote'  # names are case-insensitive
    assert classads.evaluate(ads[1], "N") == 3


def test_old_format_job_ad_evaluates_expressions():
    text = 'MemoryUsage = 100\nRequestMemory = MemoryUsage * 2\n# comment\nOwner = "alice"\n'
    ad = classads.parse_ad(text)
    assert classads.evaluate(ad, "RequestMemory") == 200
    assert classads.evaluate(ad, "Owner") == "alice"


def test_old_format_ads_separated_by_blank_lines():
    ads = classads.parse_ads("A = 1\nB = 2\n\n\nA = 3\n")
    assert [classads.evaluate(ad, "A") for ad in ads] == [1, 3]


@pytest.mark.parametrize(
    "text",
    [
        "[ a = 1 ] [ b = ",  # the library alone drops the second ad silently
        "[ a = 1 ] garbage",
        "[ a = 1 ; b = ]",
        '[ a = "unterminated ]',
        "[ a = 1 ] /* open",
        "a = 1\nnot an attribute\n",
        "A = 1\n\nB = (\n",
    ],
)
def test_malformed_text_raises(text):
    with pytest.raises(ClassAdError):
        classads.parse_ads(text)


def test_parse_ad_wants_exactly_one():
    with pytest.raises(ClassAdError, match="exactly one"):
        classads.parse_ad("[ a = 1 ] [ b = 2 ]")
    with pytest.raises(ClassAdError, match="exactly one"):
        classads.parse_ad("  \n")


def test_evaluate_missing_undefined_and_error():
    ad = classads.parse_ad("[ u = undefined; r = x.y; e = error; z = 1 / 0 ]")
    assert classads.evaluate(ad, "missing", 7) == 7
    assert classads.evaluate(ad, "u") is None
    assert classads.evaluate(ad, "r", "d") == "d"
    with pytest.raises(ClassAdError, match="ERROR"):
        classads.evaluate(ad, "e")
    with pytest.raises(ClassAdError, match="z"):
        classads.evaluate(ad, "z")


def test_printed_ads_parse_back_with_awkward_strings():
    values = {
        "TransferSuccess": False,
        "TransferError": 'two\nlines "quoted" ]',
        "N": 12,
        "F": 1.5,
    }
    text = classads.print_ads([classads.new_ad(values), classads.new_ad({"X": "y"})])
    first, second = classads.parse_ads(text)
    assert {k: classads.evaluate(first, k) for k in values} == values
    assert classads.evaluate(second, "X") == "y"


def test_new_ad_refuses_non_literals():
    with pytest.raises(ClassAdError, match="set"):
        classads.new_ad({"x": {1}})
    with pytest.raises(ClassAdError, match="NoneType"):
        classads.new_ad({"x": [None]})


def test_nested_lists_and_ads_round_trip():
    ad = classads.new_ad({"Errors": [{"ErrorType": "Parameter", "ErrorCode": 2}], "L": [1, "a"]})
    back = classads.parse_ad(classads.print_ad(ad))
    (error,) = classads.evaluate(back, "Errors")
    assert classads.evaluate(error, "ErrorType") == "Parameter"
    assert classads.evaluate(back, "L") == [1, "a"]


def test_integers_are_not_mistaken_for_the_error_and_undefined_markers():
    ad = classads.parse_ad("[ one = 1; two = 2; yes = true ]")
    assert classads.evaluate(ad, "one") == 1
    assert classads.evaluate(ad, "two") == 2
    assert classads.evaluate(ad, "yes") is True


def test_old_format_printing_parses_back():
    ad = classads.new_ad({"PluginType": "FileTransfer", "MultipleFileSupport": True})
    text = classads.print_ad(ad, old=True)
    assert not text.lstrip().startswith("[")
    assert classads.evaluate(classads.parse_ad(text), "MultipleFileSupport") is True
