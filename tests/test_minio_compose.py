"""minio-compose.yml parses, and its services, ports, bucket and credentials line up with the README."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def load():
    return yaml.safe_load((ROOT / "minio-compose.yml").read_text())


def test_services_and_health():
    compose = load()
    minio = compose["services"]["minio"]
    bucket = compose["services"]["create-bucket"]
    assert "9000:9000" in minio["ports"]
    assert minio["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in minio["volumes"])
    assert "minio-data" in compose["volumes"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing vault/pgvault" in bucket["entrypoint"]


def test_readme_config_points_at_the_compose_service():
    readme = (ROOT / "README.md").read_text()
    compose_text = (ROOT / "minio-compose.yml").read_text()
    block = re.search(r"```toml\n(\[vault\]\nurl = \"s3://pgvault/[^`]*?)```", readme)
    assert block, "README has no MinIO [vault] example"
    text = block.group(1)
    assert 'endpoint_url = "http://127.0.0.1:9000"' in text
    user = re.search(r"MINIO_ROOT_USER:-([^}]+)}", compose_text).group(1)
    password = re.search(r"MINIO_ROOT_PASSWORD:-([^}]+)}", compose_text).group(1)
    assert f'access_key_id = "{user}"' in text
    assert f'secret_access_key = "{password}"' in text
    assert "docker compose -f minio-compose.yml up -d" in readme
