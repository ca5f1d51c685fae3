"""Credentials never travel inside a URL: a run root or a file URL with a password, a token or
a signed query would be saved in config.json and shown in Prefect parameters, logs and
artifacts. Such URLs are refused, and the error shows the URL with the secret part masked."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

# Query parameters that carry credentials (presigned S3 / GCS URLs, Azure SAS, OAuth tokens).
SECRET_QUERY_KEYS = {
    "token",
    "access_token",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "password",
    "secret",
    "key",
    "api_key",
}

WHERE_CREDENTIALS_GO = (
    "put credentials in the environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_ENDPOINT_URL) or in a Prefect Secret block named by storage.secret_block"
)


def masked(url: str) -> str:
    """The URL with user info and query replaced by ***."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    return parts._replace(netloc=netloc, query="***" if parts.query else "").geturl()


def check_no_credentials(url: str, where: str) -> None:
    """Raise ValueError naming `where` if `url` carries a user/password or a secret query."""
    if "://" not in url:
        return
    parts = urlsplit(url)
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    secret_query = [k for k, _ in parse_qsl(parts.query) if k.lower() in SECRET_QUERY_KEYS]
    if userinfo or secret_query:
        what = "user info" if userinfo else f"query parameter(s) {sorted(secret_query)}"
        raise ValueError(
            f"{where}: {masked(url)} carries credentials ({what}); URLs are saved and shown in "
            f"the UI, so they must not hold secrets: {WHERE_CREDENTIALS_GO}"
        )
