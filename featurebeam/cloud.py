"""Google Cloud clients that work the same against production and local emulators.

Every place in featurebeam that talks to GCS or BigQuery gets its client here, so the one
decision "real service or emulator" is made in one spot, from the environment:

* ``STORAGE_EMULATOR_HOST`` (e.g. ``http://127.0.0.1:9023``): google-cloud-storage honours it
  itself; we add anonymous credentials so no token is ever fetched.
* ``BIGQUERY_EMULATOR_HOST`` (e.g. ``http://127.0.0.1:9050``): the BigQuery REST endpoint. A
  bare ``host:port`` is accepted and taken as ``http://``.
* ``BIGQUERY_STORAGE_EMULATOR_HOST`` (e.g. ``127.0.0.1:9060``): the BigQuery Storage Read API
  (gRPC, plaintext). No Google library reads this variable; it is this project's convention.

With none of them set, clients use Application Default Credentials and the production
endpoints. The project comes from ``project=``, else ``GOOGLE_CLOUD_PROJECT``, else (production
only) whatever ADC infers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from featurebeam.errors import ConfigError

if TYPE_CHECKING:
    from google.cloud import bigquery, bigquery_storage, storage

STORAGE_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
BIGQUERY_EMULATOR_ENV = "BIGQUERY_EMULATOR_HOST"
BIGQUERY_STORAGE_EMULATOR_ENV = "BIGQUERY_STORAGE_EMULATOR_HOST"


def storage_client(*, project: str | None = None) -> storage.Client:
    """Return a GCS client: the emulator's if ``STORAGE_EMULATOR_HOST`` is set, else ADC.

    ``project`` is needed only to create buckets; reads and writes of existing objects do not
    use it.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if os.environ.get(STORAGE_EMULATOR_ENV):
        # The library routes every request to the emulator on its own once the variable is
        # set; anonymous credentials keep it from looking for ADC or refreshing a token.
        return storage.Client(
            project=_emulator_project(project, STORAGE_EMULATOR_ENV),
            credentials=AnonymousCredentials(),
        )
    return storage.Client(project=project or os.environ.get("GOOGLE_CLOUD_PROJECT"))


def bigquery_client(*, project: str | None = None, location: str | None = None) -> bigquery.Client:
    """Return a BigQuery client: the emulator's if ``BIGQUERY_EMULATOR_HOST`` is set, else ADC."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    host = os.environ.get(BIGQUERY_EMULATOR_ENV)
    if host:
        # google-cloud-bigquery uses the variable verbatim as its base URL, so a bare
        # host:port (as other tools write it) would produce unusable URLs: add the scheme.
        endpoint = host if "://" in host else f"http://{host}"
        return bigquery.Client(
            project=_emulator_project(project, BIGQUERY_EMULATOR_ENV),
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=endpoint),
            location=location,
        )
    return bigquery.Client(
        project=project or os.environ.get("GOOGLE_CLOUD_PROJECT"), location=location
    )


def bigquery_read_client() -> bigquery_storage.BigQueryReadClient:
    """Return a BigQuery Storage Read API client (gRPC).

    Against the emulator (``BIGQUERY_STORAGE_EMULATOR_HOST``) the channel is plaintext and
    unauthenticated; otherwise ADC over TLS. Pass it as ``bqstorage_client=`` to
    ``RowIterator.to_arrow()`` or use ``create_read_session`` / ``read_rows`` directly.
    """
    from google.cloud import bigquery_storage

    host = os.environ.get(BIGQUERY_STORAGE_EMULATOR_ENV)
    if host:
        import grpc
        from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
            BigQueryReadGrpcTransport,
        )

        # The default transport insists on TLS + OAuth; the emulator speaks neither.
        channel = grpc.insecure_channel(host.removeprefix("http://"))
        return bigquery_storage.BigQueryReadClient(
            transport=BigQueryReadGrpcTransport(channel=channel)
        )
    return bigquery_storage.BigQueryReadClient()


def _emulator_project(project: str | None, env: str) -> str:
    project = project or os.environ.get("GOOGLE_CLOUD_PROJECT")
    if not project:
        raise ConfigError(
            f"{env} is set, so the emulator is used, but no project was given: an emulator "
            "cannot infer one from credentials. Pass project=... or set GOOGLE_CLOUD_PROJECT."
        )
    return project
