"""What provenance costs per stored image, and whether the watermark survives.

1. Signing: encoding a 512 px image with its metadata, with and without a C2PA manifest (a
   development chain from tools.make_c2pa_cert), in PNG, JPEG and WebP. The image is noise, the
   worst case: a PNG of it is the largest a 512 px image makes (about 790 kB), and signing hashes
   every byte. Each round encodes both sides in alternating order; the medians of the per-image CPU
   times are reported, and the signing cost is their difference (goal: at most 20 ms for the PNG).
2. The watermark (WATERMARK=on): 40 of the demo model's images at 256 px (10 prompts, 4 seeds),
   made by the server's own route, each re-encoded as a JPEG at quality 90 as a platform does with
   an upload; the share in which the watermark reads back (goal: at least 90 %), and the CPU time
   of marking one image at 256 and at 512 px.

    .venv/bin/python -m bench.provenance [--rounds 30] [--images 40]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.harness import write_results
from config import Settings
from imagegen import create_app
from imagegen.jobs import GenerationParams
from imagegen.provenance import Provenance, watermark, watermarked
from tools.make_c2pa_cert import write_chain


def cpu_ms(provenance: Provenance, image: Image.Image, params: GenerationParams) -> float:
    started = time.process_time()
    provenance.encode(image, params, 0, None)
    return (time.process_time() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as folder:
        chain, key = write_chain(Path(folder))
        plain = Provenance(Settings(_env_file=None))
        signed = Provenance(Settings(_env_file=None, c2pa_cert=chain, c2pa_key=key))
        rows = []
        for output_format in ("png", "jpeg", "webp"):
            params = GenerationParams(
                "a red circle",
                "",
                512,
                512,
                20,
                7.0,
                (1,),
                "default",
                "models/demo-shapes",
                output_format=output_format,
            )
            times: dict[bool, list[float]] = {True: [], False: []}
            for n in range(args.rounds):
                for side in (True, False) if n % 2 else (False, True):
                    times[side].append(cpu_ms(signed if side else plain, image, params))
            unsigned_ms, signed_ms = statistics.median(times[False]), statistics.median(times[True])
            rows.append(
                {
                    "format": output_format,
                    "encode_ms": round(unsigned_ms, 2),
                    "encode_and_sign_ms": round(signed_ms, 2),
                    "signing_ms": round(signed_ms - unsigned_ms, 2),
                }
            )
            print(
                f"{output_format}: encode {unsigned_ms:.1f} ms, with a C2PA manifest {signed_ms:.1f} ms: "
                f"signing {signed_ms - unsigned_ms:.1f} ms (CPU, median of {args.rounds})"
            )
    png = rows[0]["signing_ms"]
    print(f"signing a 512 px PNG: {png:.1f} ms (goal <= 20 ms)")
    found, marking = survival(args.images), marking_ms(args.rounds)
    print(f"watermark read back after a JPEG re-encode at quality 90: {found} of {args.images} (goal >= 90 %)")
    print(", ".join(f"marking a {size} px image: {ms:.1f} ms" for size, ms in marking.items()) + " (CPU)")
    write_results(
        "provenance",
        {
            "rounds": args.rounds,
            "size": 512,
            "rows": rows,
            "png_signing_ms": png,
            "watermark_images": args.images,
            "watermark_found_after_jpeg_90": found,
            "watermark_ms": marking,
        },
    )


PROMPTS = [
    f"a {colour} {shape} on a {background} background"
    for colour, shape, background in (
        ("red", "circle", "white"),
        ("blue", "square", "black"),
        ("green", "triangle", "yellow"),
        ("yellow", "star", "blue"),
        ("purple", "circle", "green"),
        ("orange", "square", "white"),
        ("black", "triangle", "red"),
        ("white", "star", "purple"),
        ("pink", "circle", "gray"),
        ("cyan", "square", "orange"),
    )
]


def survival(count: int) -> int:
    """How many of `count` demo images, marked by the server and re-encoded as JPEG at quality 90,
    still read as watermarked."""
    with tempfile.TemporaryDirectory() as folder:
        app = create_app(
            Settings(
                _env_file=None, watermark="on", result_cache=False, data_dir=Path(folder), image_dir=Path(folder) / "i"
            )
        )
        client = app.test_client()
        try:
            deadline = time.monotonic() + 600  # a bound, not a pace: the model loads first
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            found = 0
            for n in range(count):
                body = {"prompt": PROMPTS[n % len(PROMPTS)], "seed": n // len(PROMPTS), "width": 256, "height": 256}
                answer = client.post("/generate", json={**body, "response_format": "b64_json"})
                assert answer.status_code == 200, answer.json
                image = Image.open(io.BytesIO(base64.b64decode(answer.json["images"][0]["b64_json"])))
                again = io.BytesIO()
                image.convert("RGB").save(again, "JPEG", quality=90)
                found += watermarked(Image.open(again))
            return found
        finally:
            app.extensions["imagegen"].stop(30)


def marking_ms(rounds: int) -> dict[int, float]:
    """Median CPU milliseconds of marking one smooth image, at 256 and 512 px."""
    smooth = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    medians = {}
    for size in (256, 512):
        image = Image.fromarray(smooth).resize((size, size), Image.Resampling.BICUBIC)
        times = []
        for _ in range(rounds):
            started = time.process_time()
            watermark(image)
            times.append((time.process_time() - started) * 1000)
        medians[size] = round(statistics.median(times), 2)
    return medians


if __name__ == "__main__":
    main()
