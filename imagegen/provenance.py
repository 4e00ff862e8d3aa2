"""What every stored image says about its making: metadata that tools read (METADATA), an invisible
watermark (WATERMARK), and a signed C2PA manifest (C2PA_CERT, C2PA_KEY), added where the image is
encoded, on the worker.

Why C2PA through c2pa-python: it is the Content Authenticity Initiative's own implementation (the
Rust c2pa-rs that c2patool and the verify sites use), so a manifest written here is the one every
reader checks; writing JUMBF boxes and COSE signatures by hand would be ours to get wrong.

Why XMP with IPTC's digital source type in every image, signed or not: it is what platforms and
the EU AI Act's marking duty look for first (`trainedAlgorithmicMedia`), and costs one text chunk.

Why the watermark is invisible-watermark's DWT-DCT-SVD and not the DWT-DCT that SDXL's reference
code uses (same library, same 48-bit message): measured on the demo model's 256 px images, DWT-DCT
read back none of 8 after a JPEG re-encode at quality 90 (bit accuracy 0.35-0.56, and only 2 of 8
even before it: flat regions carry no signal), DWT-DCT-SVD all 8 (bench/provenance.py measures 40).
The metadata and the manifest say what made an image as long as they stay on it; the watermark is
what is left once a platform strips them.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
from PIL import Image

from config import Settings
from imagegen import __version__, infotext
from imagegen.jobs import GenerationParams
from imagegen.storage import FORMATS, image_bytes, input_png

log = logging.getLogger(__name__)

GENERATOR = "imagegen"
# IPTC's digital source types: made by a trained model; an existing image changed by one.
CREATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
EDITED = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
# Modes that start from the request's image (GenerationParams.mode): their manifests name it.
FROM_AN_IMAGE = {"img2img", "inpaint", "outpaint", "variation", "upscale"}
XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    Iptc4xmpExt:DigitalSourceType={source}
    xmp:CreatorTool={tool}/>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="r"?>"""


def xmp(source: str) -> bytes:
    """The XMP packet of a generated image: its IPTC digital source type and the software."""
    return XMP.format(source=quoteattr(source), tool=quoteattr(f"{GENERATOR} {__version__}")).encode()


def describe(settings: Settings) -> dict[str, Any]:
    """What the images carry, as /status shows it (from the settings alone: an API replica of a
    cluster signs nothing itself, its workers do)."""
    signed = settings.c2pa_cert is not None and settings.c2pa_key is not None
    return {
        "metadata": settings.metadata,
        "c2pa": {
            "signing": signed,
            "signer": signer_name(settings.c2pa_cert.read_bytes()) if settings.c2pa_cert and signed else None,
            "includes_prompt": signed and settings.c2pa_include_prompt,
        },
    }


@dataclass(frozen=True)
class Signer:
    """c2pa-python's signer and the context its manifests are built in."""

    signer: Any
    context: Any


class Provenance:
    """Encodes a job's images with the metadata METADATA allows and signs them where a certificate
    is given. One per engine; the signer is made once (its key read at start, so a bad one stops
    the start, not a job)."""

    def __init__(self, settings: Settings) -> None:
        self.metadata = settings.metadata
        self.include_prompt = settings.c2pa_include_prompt
        self.watermark = settings.watermark == "on"
        self._signer = make_signer(settings) if settings.c2pa_cert and settings.c2pa_key else None

    def encode(self, image: Image.Image, params: GenerationParams, index: int, parent: Image.Image | None) -> bytes:
        """The job's `index`th image in its output format: with `full` metadata its parameters (the
        `imagegen` chunk, A1111's infotext) and XMP, with `minimal` the XMP alone, with `none`
        nothing; then a C2PA manifest, where a certificate is given (`parent`: the edit's image,
        its ingredient)."""
        full = self.metadata == "full"
        source = EDITED if params.mode in FROM_AN_IMAGE else CREATED
        if self.watermark and markable(image):
            image = watermark(image)
        data = image_bytes(
            image,
            params.output_format,
            params.quality,
            infotext.write(params, index) if full else "",
            params.image_metadata(index) if full else None,
            xmp(source) if self.metadata != "none" else None,
        )
        if self._signer is None:
            return data
        return self._sign(data, params, source, parent)

    def warnings(self, params: GenerationParams) -> list[str]:
        """What a job's images lack of what the settings give others: a watermark, on images too
        small to carry one."""
        width, height = params.output_size
        if self.watermark and width * height < WATERMARK_PIXELS:
            return [f"WATERMARK: images of {width}x{height} are too small to carry the watermark (256x256 or more)"]
        return []

    def _sign(self, data: bytes, params: GenerationParams, source: str, parent: Image.Image | None) -> bytes:
        """A C2PA manifest (c2pa.created, or c2pa.opened and c2pa.edited with the edit's image as
        its parent ingredient) added to the encoded image; no thumbnail (a reader draws the image itself, and
        making one costs ten times the signature)."""
        import c2pa

        described: dict[str, Any] = {"model": params.model}
        if self.include_prompt and params.prompt:
            described["prompt"] = params.prompt
        action = "c2pa.edited" if parent is not None else "c2pa.created"
        agent = {"name": GENERATOR, "version": __version__}
        manifest = {
            "claim_generator_info": [agent],
            "assertions": [
                {
                    "label": "c2pa.actions",
                    "data": {
                        "actions": [
                            {
                                "action": action,
                                "digitalSourceType": source,
                                "softwareAgent": agent,
                                "parameters": described,
                            }
                        ]
                    },
                }
            ],
        }
        kind = FORMATS[params.output_format][2]
        signed = io.BytesIO()
        assert self._signer is not None
        with c2pa.Builder(manifest, self._signer.context) as builder:
            if parent is not None:  # the edit intent opens its parent first (a `c2pa.opened` action)
                builder.set_intent(c2pa.C2paBuilderIntent.EDIT)
                ingredient = {"title": "input.png", "relationship": "parentOf"}
                builder.add_ingredient(ingredient, "image/png", io.BytesIO(input_png(parent)[1]))
            builder.sign(self._signer.signer, kind, io.BytesIO(data), signed)
        return signed.getvalue()


# The watermark's message: SDXL's (diffusers' StableDiffusionXLWatermarker), 48 bits.
WATERMARK_BITS = [int(bit) for bit in bin(0b101100111110110010010000011110111011000110011110)[2:]]
WATERMARK_METHOD = "dwtDctSvd"
WATERMARK_PIXELS = 256 * 256  # the fewest the library marks
# The share of the message's bits an image must give back to count as marked (a random image gives
# half of them).
DETECTED = 0.9


def markable(image: Image.Image) -> bool:
    return image.width * image.height >= WATERMARK_PIXELS


def watermark(image: Image.Image) -> Image.Image:
    """The image with the watermark in it (invisible: about one level of 255 per pixel)."""
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    marked = encoder.encode(cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR), WATERMARK_METHOD)
    return Image.fromarray(cv2.cvtColor(marked, cv2.COLOR_BGR2RGB))


def watermarked(image: Image.Image) -> bool:
    """Whether the image carries the watermark: DETECTED of its bits read back."""
    import cv2
    from imwatermark import WatermarkDecoder

    if not markable(image):
        return False
    bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
    bits = WatermarkDecoder("bits", len(WATERMARK_BITS)).decode(bgr, WATERMARK_METHOD)
    return sum(int(a) == b for a, b in zip(bits, WATERMARK_BITS, strict=True)) >= DETECTED * len(WATERMARK_BITS)


def make_signer(settings: Settings) -> Signer:
    """The C2PA signer of C2PA_CERT and C2PA_KEY (ES256 or Ed25519, from the key's type); a stop
    of the start-up naming the setting if they do not sign."""
    import c2pa
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    assert settings.c2pa_cert and settings.c2pa_key
    chain, private = settings.c2pa_cert.read_bytes(), settings.c2pa_key.read_bytes()
    try:
        key = load_pem_private_key(private, None)
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"C2PA_KEY {settings.c2pa_key} is no unencrypted PEM private key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm = b"ed25519"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1":
        algorithm = b"es256"
    else:
        raise SystemExit(f"C2PA_KEY {settings.c2pa_key} must be an ES256 (P-256) or Ed25519 key")
    try:
        made = c2pa.Signer.from_info(c2pa.C2paSignerInfo(algorithm, chain, private, None))
    except c2pa.C2paError as exc:
        raise SystemExit(f"C2PA_CERT and C2PA_KEY do not make a C2PA signer: {exc}") from None
    return Signer(made, c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}}))


def signer_name(chain: bytes) -> str:
    """The signing certificate's subject (the chain's first), as a reader shows who signed."""
    from cryptography import x509

    return x509.load_pem_x509_certificates(chain)[0].subject.rfc4514_string()
