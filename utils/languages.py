"""The language table: the short codes users type, mapped to FLEURS configs, Common Voice codes,
display names and the espeak-ng voice used by the generated corpus.

FLEURS has 102 configs; the short code is the part before the region (``ast_es`` -> ``ast``).
``resolve_language`` accepts a short code, a FLEURS config name or a few aliases, and fails with
close matches for anything else.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError


@dataclass(frozen=True)
class Language:
    code: str  # what users type: ISO 639-1 where it exists, else ISO 639-3
    fleurs: str  # google/fleurs config name
    name: str
    common_voice: Optional[str]  # Common Voice locale, None where CV has no such language
    espeak_voice: Optional[str]  # espeak-ng voice for the generated corpus, None where none exists


# fleurs config | display name | Common Voice locale ("-" = none) | espeak-ng voice ("-" = none)
_TABLE = """
af_za|Afrikaans|af|af
am_et|Amharic|am|am
ar_eg|Arabic|ar|ar
as_in|Assamese|as|as
ast_es|Asturian|ast|-
az_az|Azerbaijani|az|az
be_by|Belarusian|be|be
bg_bg|Bulgarian|bg|bg
bn_in|Bengali|bn|bn
bs_ba|Bosnian|-|bs
ca_es|Catalan|ca|ca
ceb_ph|Cebuano|-|-
ckb_iq|Sorani Kurdish|ckb|-
cmn_hans_cn|Mandarin Chinese|zh-CN|cmn
cs_cz|Czech|cs|cs
cy_gb|Welsh|cy|cy
da_dk|Danish|da|da
de_de|German|de|de
el_gr|Greek|el|el
en_us|English|en|en-us
es_419|Spanish|es|es
et_ee|Estonian|et|et
fa_ir|Persian|fa|fa
ff_sn|Fula|-|-
fi_fi|Finnish|fi|fi
fil_ph|Filipino|-|-
fr_fr|French|fr|fr-fr
ga_ie|Irish|ga-IE|ga
gl_es|Galician|gl|-
gu_in|Gujarati|gu-IN|gu
ha_ng|Hausa|ha|-
he_il|Hebrew|he|he
hi_in|Hindi|hi|hi
hr_hr|Croatian|-|hr
hu_hu|Hungarian|hu|hu
hy_am|Armenian|hy-AM|hy
id_id|Indonesian|id|id
ig_ng|Igbo|ig|-
is_is|Icelandic|is|is
it_it|Italian|it|it
ja_jp|Japanese|ja|ja
jv_id|Javanese|-|-
ka_ge|Georgian|ka|ka
kam_ke|Kamba|-|-
kea_cv|Kabuverdianu|-|-
kk_kz|Kazakh|kk|kk
km_kh|Khmer|km|-
kn_in|Kannada|kn|kn
ko_kr|Korean|ko|ko
ky_kg|Kyrgyz|ky|ky
lb_lu|Luxembourgish|lb|lb
lg_ug|Ganda|lg|-
ln_cd|Lingala|ln|-
lo_la|Lao|lo|-
lt_lt|Lithuanian|lt|lt
luo_ke|Luo|luo|-
lv_lv|Latvian|lv|lv
mi_nz|Maori|mi|mi
mk_mk|Macedonian|mk|mk
ml_in|Malayalam|ml|ml
mn_mn|Mongolian|mn|-
mr_in|Marathi|mr|mr
ms_my|Malay|ms|ms
mt_mt|Maltese|mt|mt
my_mm|Burmese|my|my
nb_no|Norwegian Bokmal|nb-NO|nb
ne_np|Nepali|ne-NP|ne
nl_nl|Dutch|nl|nl
nso_za|Northern Sotho|nso|-
ny_mw|Nyanja|ny|-
oc_fr|Occitan|oc|-
om_et|Oromo|-|om
or_in|Odia|or|or
pa_in|Punjabi|pa-IN|pa
pl_pl|Polish|pl|pl
ps_af|Pashto|ps|-
pt_br|Portuguese|pt|pt-br
ro_ro|Romanian|ro|ro
ru_ru|Russian|ru|ru
sd_in|Sindhi|sd|sd
sk_sk|Slovak|sk|sk
sl_si|Slovenian|sl|sl
sn_zw|Shona|sn|-
so_so|Somali|so|-
sr_rs|Serbian|sr|sr
sv_se|Swedish|sv-SE|sv
sw_ke|Swahili|sw|sw
ta_in|Tamil|ta|ta
te_in|Telugu|te|te
tg_tj|Tajik|tg|-
th_th|Thai|th|th
tr_tr|Turkish|tr|tr
uk_ua|Ukrainian|uk|uk
umb_ao|Umbundu|-|-
ur_pk|Urdu|ur|ur
uz_uz|Uzbek|uz|uz
vi_vn|Vietnamese|vi|vi
wo_sn|Wolof|-|-
xh_za|Xhosa|xh|-
yo_ng|Yoruba|yo|-
yue_hant_hk|Cantonese|zh-HK|yue
zu_za|Zulu|zu|-
"""


def _parse(table: str) -> dict[str, Language]:
    languages = {}
    for line in table.strip().splitlines():
        fleurs, name, cv, voice = line.split("|")
        code = fleurs.split("_")[0]
        languages[code] = Language(
            code=code,
            fleurs=fleurs,
            name=name,
            common_voice=None if cv == "-" else cv,
            espeak_voice=None if voice == "-" else voice,
        )
    return languages


LANGUAGES: dict[str, Language] = _parse(_TABLE)
# ISO 639 "mul": a mixture of languages, e.g. the generated multilingual pretraining corpus.
MULTILINGUAL = Language(code="mul", fleurs="", name="Multilingual mixture", common_voice=None, espeak_voice=None)
# Other spellings users type for the same language.
ALIASES: dict[str, str] = {"zh": "cmn", "no": "nb", "fil": "fil", "tl": "fil", "ku": "ckb"}
_BY_FLEURS = {lang.fleurs: lang for lang in LANGUAGES.values()}


def resolve_language(code: str) -> Language:
    """Look a language up by short code, alias or FLEURS config; unknown codes list close matches."""
    key = code.strip().lower().replace("-", "_")
    if key == MULTILINGUAL.code:
        return MULTILINGUAL
    if key in LANGUAGES:
        return LANGUAGES[key]
    if key in ALIASES:
        return LANGUAGES[ALIASES[key]]
    if key in _BY_FLEURS:
        return _BY_FLEURS[key]
    to_code = {c: c for c in LANGUAGES} | {lang.fleurs: lang.code for lang in LANGUAGES.values()}
    to_code |= {lang.name.lower(): lang.code for lang in LANGUAGES.values()}
    close = dict.fromkeys(to_code[m] for m in difflib.get_close_matches(key, list(to_code), n=8, cutoff=0.6))
    hint = f"did you mean {', '.join(list(close)[:5])}?" if close else "see utils/languages.py for the table"
    raise UsageError(f"unknown language {code!r}: expected one of the {len(LANGUAGES)} FLEURS codes; {hint}")
