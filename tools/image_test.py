"""`make image-test`: builds the container image and proves it, on this machine.

1. A Docker daemon (started here from Debian's `dockerd` if none answers) and a base image: with no
   registry in reach, `debian:bookworm-slim` is made from Debian's packages (`debootstrap
   --variant=minbase bookworm`, then `docker import`).
2. The build, with what the builder has on its disk in `docker/extras/` (git-ignored, build time
   only): the host's CA bundle for pip, and the torch wheel of PIP_FIND_LINKS (a CPU build) if one
   lies there. Prints the build time and the image's size.
3. One machine: `docker run` of the README's line (with a short health-check interval); `/health`
   is ready, the HEALTHCHECK says healthy, and `/generate` returns a PNG.
4. compose.yaml, as `docker compose config` (or Debian's Compose v1) reads it.
5. The cluster roles from the same image, on this machine's PostgreSQL and RabbitMQ (host
   network): one job through a worker container; then, with a second worker container, one
   `docker kill`ed mid-batch, and every job ends `succeeded`.

    .venv/bin/python -m tools.image_test [--tag imagegen:test]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import free_port, wait_for
from config import ROOT

EXTRAS = ROOT / "docker" / "extras"
BASE = "debian:bookworm-slim"
ADMIN_TOKEN = "image-test-admin-token-0123456789abcdef"
API_KEY = "image-test-key"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"


def docker(*arguments: str, check: bool = True, stderr: bool = False) -> str:
    """A docker command's output (with `stderr`, both streams: a container's logs)."""
    done = subprocess.run(["docker", *arguments], check=False, capture_output=True, text=True)
    if check and done.returncode:
        raise SystemExit(f"docker {' '.join(arguments[:3])} failed: {done.stderr or done.stdout}")
    return (done.stdout + done.stderr if stderr else done.stdout).strip()


def ensure_daemon() -> None:
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return
    if not shutil.which("dockerd"):
        raise SystemExit("no Docker daemon answers and there is no dockerd here (Debian: apt-get install docker.io)")
    print("starting dockerd", flush=True)
    log = open(ROOT / "logs" / "dockerd.log", "ab")  # noqa: SIM115 (the daemon outlives this script)
    subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: subprocess.run(["docker", "info"], capture_output=True).returncode == 0, "dockerd", 60)


def ensure_base() -> None:
    if docker("images", "-q", BASE):
        return
    if subprocess.run(["docker", "pull", BASE], capture_output=True).returncode == 0:
        return
    if not shutil.which("debootstrap"):
        raise SystemExit(f"{BASE} cannot be pulled and there is no debootstrap (apt-get install debootstrap)")
    print(f"making {BASE} with debootstrap", flush=True)
    root = Path("/tmp") / f"imagegen-rootfs-{os.getpid()}"
    subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root)], check=True, capture_output=True)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    shutil.rmtree(root)


def prepare_extras() -> None:
    """The host's CA bundle and torch wheel, for the build only."""
    EXTRAS.mkdir(exist_ok=True)
    bundle = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        shutil.copy(bundle, EXTRAS / "ca.crt")
    for folder in filter(None, os.environ.get("PIP_FIND_LINKS", "").split()):
        for wheel in Path(folder).glob("torch-2.13.0*.whl"):
            if not (EXTRAS / wheel.name).exists():
                shutil.copy(wheel, EXTRAS / wheel.name)


def build(tag: str) -> None:
    started = time.monotonic()
    subprocess.run(["docker", "build", "-t", tag, str(ROOT)], check=True)
    size = int(docker("image", "inspect", tag, "--format", "{{.Size}}"))
    print(f"built {tag} in {time.monotonic() - started:.0f} s; image size {size / 2**30:.2f} GiB", flush=True)


def validate_compose() -> None:
    """compose.yaml as Compose reads it (`docker compose`, or Debian's Compose v1), secrets given."""
    secrets_given = {
        **os.environ,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "API_KEYS": API_KEY,
        "SECRET_KEY": "s",
        **{f"{name}_PASSWORD": "p" * 12 for name in ("POSTGRES", "RABBITMQ", "REDIS", "MINIO_ROOT", "MINIO_APP")},
    }
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run([*command, "version"], capture_output=True).returncode == 0:
            for profile in ([], ["--profile", "gpu"]):
                subprocess.run([*command, *profile, "config", "-q"], cwd=ROOT, env=secrets_given, check=True)
            print(f"compose.yaml: valid for {' '.join(command)}", flush=True)
            return
    print("compose.yaml: not checked (no docker compose or docker-compose here)", flush=True)


def one_machine(tag: str) -> None:
    """The README's `docker run` line, on a port of this machine."""
    port = free_port()
    volume = f"imagegen-test-{secrets.token_hex(4)}"
    name = docker(
        "run", "-d", "-p", f"127.0.0.1:{port}:5000", "-v", f"{volume}:/data", "--health-interval", "2s",
        "-e", f"API_KEYS={API_KEY}", "-e", f"ADMIN_TOKEN={ADMIN_TOKEN}", tag,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: call(f"{base}/health")[0] == 200, "the container to be ready", 180)
        status, body = call(f"{base}/generate", {"prompt": "a red circle", "seed": 1, "response_format": "b64_json"})
        png = base64.b64decode(body["images"][0]["b64_json"]) if status == 200 else b""
        assert png.startswith(b"\x89PNG"), (status, body)
        health = wait_for(
            lambda: (state := docker("inspect", name, "--format", "{{.State.Health.Status}}")) == "healthy" and state,
            "the HEALTHCHECK",
            60,
        )
        user = docker("exec", name, "id", "-un")
        print(f"one machine: /health 200, /generate a PNG of {len(png)} bytes, as {user}, health {health}", flush=True)
        docker("stop", "-t", "60", name)  # SIGTERM: the server drains and exits by itself
        code = docker("inspect", name, "--format", "{{.State.ExitCode}}")
        drained = "signal SIGTERM: draining" in docker("logs", name, stderr=True)
        assert code == "0" and drained, (code, drained)
        print("one machine: docker stop drained and exited 0", flush=True)
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", volume, check=False)


def cluster(tag: str) -> None:
    """An API container and worker containers on this machine's PostgreSQL and RabbitMQ."""
    import psycopg

    database = f"imagegen_image_{secrets.token_hex(4)}"
    queue = f"imagegen-image-{secrets.token_hex(4)}"
    volume = f"imagegen-cluster-{secrets.token_hex(4)}"
    port = free_port()
    env = {
        "QUEUE_BACKEND": "celery",
        "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
        "BROKER_QUEUE": queue,
        "DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        "IMAGE_DIR": "/data/images",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "API_KEYS": API_KEY,
        "SECRET_KEY": "image-test-secret",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "WORKER_HEARTBEAT_SECONDS": "1",
        "RECONCILE_SECONDS": "1",
        "MAX_STEPS": "500",
        "RATE_LIMIT_DEFAULT": "100000/minute",  # this script polls
    }
    flags = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    started: list[str] = []

    def run(role: str, name: str, worker: str = "") -> None:
        started.append(name)
        named = ["-e", f"WORKER_NAME={worker}"] if worker else []  # on the host network every container is `<host>-1`
        docker("run", "-d", "--name", name, "--network", "host", "-v", f"{volume}:/data", *flags, *named, tag, role)

    base = f"http://127.0.0.1:{port}"
    suffix = secrets.token_hex(3)
    try:
        run("worker", f"imagegen-w1-{suffix}", "w1")
        run("api", f"imagegen-api-{suffix}")
        wait_for(lambda: call(f"{base}/health")[0] == 200, "the cluster to be ready", 180)
        status, body = call(f"{base}/generate", {"prompt": "a red circle", "seed": 1})
        assert status == 200 and body["images"], (status, body)
        print("cluster: one job through the worker container", flush=True)

        run("worker", f"imagegen-w2-{suffix}", "w2")
        ids = []
        for seed in range(6):
            job = {"prompt": "a blue square", "seed": seed, "steps": 300, "async": True}
            status, body = call(f"{base}/generate", job)
            assert status == 202, body
            ids.append(body["id"])
        victim = wait_for(lambda: running_worker(base, ids), "a worker to be mid-batch", 120)
        docker("kill", f"imagegen-{victim}-{suffix}")
        jobs = wait_for(lambda: finished(base, ids), "every job to end", 180)
        assert [job["status"] for job in jobs] == ["succeeded"] * len(ids), jobs
        print(f"cluster: worker {victim} killed mid-batch (docker kill); {len(ids)} of {len(ids)} jobs succeeded")
    finally:
        for name in started:
            docker("rm", "-f", name, check=False)
        docker("volume", "rm", volume, check=False)
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def jobs_of(base: str, ids: list[str]) -> list[dict[str, Any]]:
    """These jobs as the caller's job list shows them (one request a poll)."""
    listed = {job["id"]: job for job in call(f"{base}/jobs?limit=100")[1].get("jobs", [])}
    return [listed.get(job_id, {"status": "unknown"}) for job_id in ids]


def running_worker(base: str, ids: list[str]) -> str | None:
    """The worker (w1 or w2) running one of these jobs past its first step."""
    if any(job["status"] == "running" and job.get("step") for job in jobs_of(base, ids)):
        workers = call(f"{base}/status")[1].get("app", {}).get("workers", [])
        return next((worker["name"] for worker in workers if worker["state"] == "busy"), None)
    return None


def finished(base: str, ids: list[str]) -> list[dict[str, Any]] | None:
    jobs = jobs_of(base, ids)
    return jobs if all(job["status"] in ("succeeded", "failed", "cancelled") for job in jobs) else None


def call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}", "X-Admin-Token": ADMIN_TOKEN}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except OSError:
        return 0, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="imagegen:test")
    parser.add_argument("--skip-build", action="store_true", help="test the image already tagged")
    args = parser.parse_args()
    ensure_daemon()
    if not args.skip_build:
        ensure_base()
        prepare_extras()
        build(args.tag)
    one_machine(args.tag)
    validate_compose()
    cluster(args.tag)
    print("image-test passed", file=sys.stderr)


if __name__ == "__main__":
    main()
