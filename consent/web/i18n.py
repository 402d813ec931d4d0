"""The portal's languages: Flask-Babel, with catalogues compiled in memory from their `.po` files.

English is the msgid; `translations/<lang>/LC_MESSAGES/messages.po` holds each other language.
No `.mo` file is kept: a catalogue is compiled the first time a request uses its language, once
per process. The language of a request is the first of: a `?lang=` switch, the language stored
on the patient's session, the `lang` cookie, the browser's `Accept-Language`, English.
"""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import NullTranslations, Translations
from flask import Flask, g, request
from flask_babel import Babel, Domain, get_locale
from werkzeug.utils import cached_property

LANGUAGES = ("en", "fr")
DEFAULT = "en"
#: The cookie that remembers a switched language (path /consent, a year).
COOKIE = "lang"
COOKIE_SECONDS = 365 * 24 * 3600
TRANSLATIONS = Path(__file__).resolve().parent / "translations"
DOMAIN = "messages"


def catalogue_path(lang: str) -> Path:
    return TRANSLATIONS / lang / "LC_MESSAGES" / f"{DOMAIN}.po"


def compile_catalogue(lang: str) -> Translations | NullTranslations:
    """The catalogue of `lang` compiled from its `.po` (fuzzy entries left out); English has none."""
    path = catalogue_path(lang)
    if not path.exists():
        return NullTranslations()
    with path.open("rb") as handle:
        catalog = read_po(handle, locale=lang, domain=DOMAIN)
    compiled = BytesIO()
    write_mo(compiled, catalog, use_fuzzy=False)
    compiled.seek(0)
    return Translations(compiled, domain=DOMAIN)


class _InMemoryDomain(Domain):
    """Flask-Babel's domain, with each language's catalogue compiled from its `.po` once per process."""

    def get_translations(self) -> Translations | NullTranslations:
        locale = get_locale()
        lang = locale.language if locale is not None else DEFAULT
        if lang not in self.cache:
            self.cache[lang] = compile_catalogue(lang)
        return self.cache[lang]


class _PortalBabel(Babel):
    @cached_property
    def domain_instance(self) -> Domain:
        return _InMemoryDomain(domain=DOMAIN)


def chosen_language() -> str | None:
    """The language the request switches to with `?lang=`, when it names one the portal speaks."""
    lang = request.args.get("lang")
    return lang if lang in LANGUAGES else None


def select_language() -> str:
    """The request's language: the switch, the session's, the cookie's, Accept-Language, English."""
    session = g.get("portal_session")
    for candidate in (chosen_language(), session.lang if session else None, request.cookies.get(COOKIE)):
        if candidate in LANGUAGES:
            return candidate
    return request.accept_languages.best_match(LANGUAGES) or DEFAULT


def page_language() -> str:
    """The language of the page being rendered (for `<html lang>`)."""
    locale = get_locale()
    return locale.language if locale is not None else DEFAULT


def init_app(app: Flask) -> None:
    """Install Flask-Babel with the portal's language choice and in-memory catalogues."""
    _PortalBabel(app, locale_selector=select_language)
