import pytest

from utils.languages import LANGUAGES, resolve_language


def test_table_covers_all_fleurs_configs():
    assert len(LANGUAGES) == 102
    assert len({lang.fleurs for lang in LANGUAGES.values()}) == 102


@pytest.mark.parametrize(
    "code, fleurs, name",
    [("en", "en_us", "English"), ("es", "es_419", "Spanish"), ("ast", "ast_es", "Asturian"), ("xh", "xh_za", "Xhosa"), ("ca", "ca_es", "Catalan")],
)
def test_paper_languages(code, fleurs, name):
    lang = resolve_language(code)
    assert (lang.code, lang.fleurs, lang.name) == (code, fleurs, name)


def test_lookup_by_config_alias_and_case():
    assert resolve_language("CMN_HANS_CN").code == "cmn"
    assert resolve_language("zh").code == "cmn"
    assert resolve_language("pt-BR").code == "pt"  # accepted as a FLEURS config spelled with a dash
    assert resolve_language("de").common_voice == "de"
    assert resolve_language("sv").common_voice == "sv-SE"


def test_paper_languages_without_voice():
    assert resolve_language("ast").espeak_voice is None
    assert resolve_language("xh").espeak_voice is None
    assert resolve_language("ca").espeak_voice == "ca"


@pytest.mark.parametrize("typed, suggestion", [("enn", "en"), ("catalan", "ca"), ("astu", "ast")])
def test_unknown_code_suggests_close_matches(typed, suggestion):
    with pytest.raises(ValueError, match=rf"unknown language '{typed}'.*did you mean.*\b{suggestion}\b"):
        resolve_language(typed)
