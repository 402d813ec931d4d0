"""Refusals written for the patient: each carries a message in gettext form, shown on the error page
in the patient's language with the refusal's HTTP status."""
from __future__ import annotations

from flask_babel import LazyString, lazy_gettext

from service.errors import FhirError


class PageError(FhirError):
    """A refusal whose `page_message` (translated when the page is rendered) the patient reads."""

    def __init__(self, page_message: LazyString, status: int = 400):
        super().__init__(str(page_message))
        self.page_message = page_message
        self.status = status


class FormExpired(PageError):
    """A POST without the right CSRF token: nothing is changed."""

    def __init__(self) -> None:
        super().__init__(lazy_gettext("This form has expired; please go back, reload the page and try again."))


class SessionExpired(PageError):
    """A signed-in page posted to after the session ended (timed out or signed out)."""

    def __init__(self) -> None:
        super().__init__(lazy_gettext("Your session has ended, so nothing was changed. Please sign in again."),
                         status=401)


class InvitationInvalid(PageError):
    """An invitation link that is unknown, already used or expired."""

    def __init__(self) -> None:
        super().__init__(lazy_gettext("This invitation link can no longer be used: it has already been used or "
                                      "has expired. Please ask for a new one."), status=410)


class TooManyAttempts(PageError):
    """Too many sign-in attempts from one address."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(lazy_gettext("Too many attempts to sign in from this connection. Please wait a few "
                                      "minutes and try again."), status=429)
        self.headers = {"Retry-After": str(retry_after)}
