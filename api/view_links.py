"""Signed links to a job's viewer page: a browser opens them without the
API key, so the link itself is the credential, for one job of one project,
until it expires (as long as the job's mask URLs)."""

from __future__ import annotations

from dataclasses import dataclass

from itsdangerous import BadSignature

from segq.api.errors import ApiError
from segq.api.public_links import public_link
from segq.api.signed_tokens import SignedTokens
from segq.clock import now_ms

_VIEW_SALT = "segq.job-view"


@dataclass(frozen=True)
class ViewGrant:
    """What a valid viewer token allows: reading one job of one project."""

    project_id: int
    job_id: int
    #: Epoch milliseconds after which the token is refused.
    expires_time: int


@dataclass(frozen=True)
class ViewLinks:
    """Signs and reads viewer tokens under the server's secret key."""

    secret_key: str
    #: The API's root as clients reach it (SEGQ_PUBLIC_URL).
    public_url: str | None
    expires_seconds: int

    def _serializer(self) -> SignedTokens:
        return SignedTokens(self.secret_key, salt=_VIEW_SALT)

    def token(self, project_id: int, job_id: int, expires_time: int | None = None) -> str:
        """``expires_time``: epoch milliseconds; by default the lifetime from now."""
        expires = now_ms() + self.expires_seconds * 1000 if expires_time is None else expires_time
        return str(self._serializer().dumps([project_id, job_id, expires]))

    def page_url(
        self, project_name: str, project_id: int, job_id: int, expires_time: int | None = None
    ) -> str:
        """The viewer page's link, absolute under SEGQ_PUBLIC_URL when set."""
        path = f"/api/v1/projects/{project_name}/context/vision/segment/{job_id}/view"
        token = self.token(project_id, job_id, expires_time)
        return public_link(self.public_url, f"{path}?token={token}")

    def grant(self, token: str | None, job_id: int) -> ViewGrant:
        """What ``token`` allows, if it is ours, unexpired and for ``job_id``:
        401 without a token, 403 for one that is forged, expired or for
        another job."""
        if not token:
            raise ApiError(401, "this page needs the signed link of the job's viewUrl")
        try:
            project_id, signed_job_id, expires = self._serializer().loads(token)
        except (BadSignature, ValueError, TypeError):
            raise ApiError(403, "this viewer link is not valid") from None
        if not all(isinstance(value, int) for value in (project_id, signed_job_id, expires)):
            raise ApiError(403, "this viewer link is not valid")
        if signed_job_id != job_id:
            raise ApiError(403, "this viewer link is for another job")
        if expires < now_ms():
            raise ApiError(403, "this viewer link has expired: GET the job for a fresh viewUrl")
        return ViewGrant(project_id, signed_job_id, expires)
