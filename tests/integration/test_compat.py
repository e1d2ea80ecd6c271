"""Drop-in compatibility with SGLang's diffusion server and OpenAI's image clients (issue 12), against the real
`refit serve`: SGLang's checksum formula computed here independently (hashlib over the safetensors files, the
parameter names from Diffusers), SGLang's failure wording, the OpenAI image fields (width/height, output_format,
response_format url, seed lists, id), /v1/models/{id}, 405 and 413 in OpenAI's error shape, unknown fields refused
by name, and the official `openai` client."""
import base64
import hashlib
import io
import json

import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from harness import GEN, MODULES, REFIT, run


def sglang_checksum(tensors: dict, names=None, dtype=torch.float32) -> str:
    """SGLang's compute_weights_checksum: SHA-256 over the tensors sorted by name, each its UTF-8 name then its raw
    bytes in the dtype the server holds (fp32 on this CPU server); only `names` when given (the parameters)."""
    h = hashlib.sha256()
    for name in sorted(names if names is not None else tensors):
        t = tensors[name]
        if t.is_floating_point():
            t = t.to(dtype)
        h.update(name.encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def disk_tensors(module_dir):
    out = {}
    for f in sorted(module_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def vae_parameter_names(vae_dir):
    """What SGLang's server hashes for the VAE: Diffusers' named_parameters (its BatchNorm statistics are buffers)."""
    from diffusers import AutoencoderKLFlux2
    return {n for n, _ in AutoencoderKLFlux2.from_pretrained(str(vae_dir)).named_parameters()}


def test_checksums_default_to_sglangs_formula_and_equal_an_independent_computation(server, ckpt):
    server.update(ckpt.base, weight_version="sglang-sum")
    served = server.checksums()
    for module in ("transformer", "text_encoder"):  # parameters only, no buffers in their files
        assert served[module] == sglang_checksum(disk_tensors(ckpt.base / module)), module
    vae = disk_tensors(ckpt.base / "vae")
    params = vae_parameter_names(ckpt.base / "vae")
    assert params < set(vae)  # the file holds buffers too, which SGLang's formula leaves out
    assert served["vae"] == sglang_checksum(vae, params)
    # `refit checksum` (default format) gives what the server gives, for every module.
    assert json.loads(run(REFIT, "checksum", ckpt.base, "--dtype", "fp32", "--json").stdout) == served
    # refit's own formula on request, on both sides.
    refit_fmt = server.post("/get_weights_checksum", {"module_names": None, "format": "refit"}).json()
    assert refit_fmt == json.loads(run(REFIT, "checksum", ckpt.base, "--dtype", "fp32", "--format", "refit", "--json").stdout)
    assert all(refit_fmt[m] != served[m] for m in MODULES)
    r = server.post("/get_weights_checksum", {"format": "md5"})
    assert r.status_code == 400 and "format" in r.json()["message"]


def test_a_failed_update_says_rolled_back_as_sglang_clients_expect(server, ckpt):
    server.update(ckpt.base, weight_version="before-corrupt")
    before = server.checksums()
    body = server.update(ckpt.corrupted, expect=400, target_modules=["transformer", "vae"])
    assert "Failed to update module 'vae'" in body["message"], body
    assert "rolled back" in body["message"].lower(), body
    assert "No weights were changed" in body["message"], body
    assert server.checksums() == before


def test_unknown_fields_are_refused_by_name(server, ckpt):
    before = server.checksums()
    r = server.post("/update_weights_from_disk", {"model_path": str(ckpt.second), "target_module": ["transformer"]})
    assert r.status_code == 400 and "unknown field(s) 'target_module'" in r.json()["message"], r.text
    assert server.checksums() == before  # a misspelled target did not update every module
    r = server.post("/get_weights_checksum", {"modules": ["vae"]})
    assert r.status_code == 400 and "unknown field(s) 'modules'" in r.json()["message"], r.text
    r = server.post("/v1/images/generations", {"prompt": "a fox", "steps": 2})
    assert r.status_code == 400 and "unknown field(s) 'steps'" in r.json()["error"]["message"], r.text


def image(reply, i=0):
    return base64.b64decode(reply["data"][i]["b64_json"])


def test_width_height_output_format_and_compression_are_honoured(server):
    r = server.post("/v1/images/generations", {"prompt": "a fox", "width": 96, "height": 64, "seed": 3, "num_inference_steps": 2})
    assert r.status_code == 200, r.text
    png = Image.open(io.BytesIO(image(r.json())))
    assert (png.format, png.size) == ("PNG", (96, 64))
    r = server.post("/v1/images/generations", {"prompt": "a fox", "size": "64x64", "width": 96, **GEN})
    assert r.status_code == 400 and "disagree with 'size'" in r.json()["error"]["message"], r.text
    sizes = {}
    for fmt, pil, compression in (("jpeg", "JPEG", 10), ("jpeg", "JPEG", 95), ("webp", "WEBP", 10), ("webp", "WEBP", 95)):
        body = {"prompt": "a fox", "seed": 3, "width": 96, "height": 64, "num_inference_steps": 2, "output_format": fmt,
                "output_compression": compression}
        reply = server.post("/v1/images/generations", body).json()
        assert reply["output_format"] == fmt
        img = Image.open(io.BytesIO(image(reply)))
        assert (img.format, img.size) == (pil, (96, 64))
        sizes[(fmt, compression)] = len(image(reply))
    assert sizes[("jpeg", 10)] < sizes[("jpeg", 95)] and sizes[("webp", 10)] < sizes[("webp", 95)], sizes
    r = server.post("/v1/images/generations", {"prompt": "a fox", "output_format": "gif", **GEN})
    assert r.status_code == 400 and "output_format" in r.json()["error"]["message"]


def test_response_format_url_serves_the_images_for_a_while(server):
    r = server.post("/v1/images/generations", {"prompt": "a fox", "n": 2, "seed": 4, "response_format": "url", **GEN})
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["id"] and all("b64_json" not in d for d in reply["data"])
    urls = [d["url"] for d in reply["data"]]
    assert urls == [f"/v1/images/{reply['id']}/content?variant={i}" for i in range(2)], urls
    fetched = [server.get(u) for u in urls]
    assert all(f.status_code == 200 and f.headers["Content-Type"] == "image/png" for f in fetched)
    inline = server.post("/v1/images/generations", {"prompt": "a fox", "n": 2, "seed": 4, **GEN}).json()
    assert [f.content for f in fetched] == [image(inline, 0), image(inline, 1)]
    r = server.get(f"/v1/images/{reply['id']}/content?variant=2")
    assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found", r.text
    assert server.get("/v1/images/0123abcd/content").status_code == 404


def test_seeds_per_image_as_sglang_draws_them(server):
    one = {s: image(server.post("/v1/images/generations", {"prompt": "a fox", "seed": s, **GEN}).json()) for s in (5, 6, 9)}
    listed = server.post("/v1/images/generations", {"prompt": "a fox", "n": 2, "seed": [9, 5], **GEN}).json()
    assert [image(listed, 0), image(listed, 1)] == [one[9], one[5]]
    counted = server.post("/v1/images/generations", {"prompt": "a fox", "n": 2, "seed": 5, **GEN}).json()
    assert [image(counted, 0), image(counted, 1)] == [one[5], one[6]]  # image i uses seed + i
    r = server.post("/v1/images/generations", {"prompt": "a fox", "n": 2, "seed": [9], **GEN})
    assert r.status_code == 400 and "one per image" in r.json()["error"]["message"]


def test_models_by_id_wrong_methods_and_413_use_openais_error_shape(server, ckpt):
    server.update(ckpt.base, weight_version="models")
    r = server.get(f"/v1/models/{ckpt.base}")
    assert r.status_code == 200 and r.json() == {"id": str(ckpt.base), "object": "model", "owned_by": "refit"}, r.text
    r = server.get("/v1/models/gpt-image-1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = server.post("/v1/images/generations", {"prompt": "a fox", "model": "gpt-image-1", **GEN})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    r = server.get("/v1/images/generations")
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and r.json()["error"]["message"].startswith("method not allowed"), r.text
    r = server.post("/health", {})
    assert r.status_code == 405 and r.headers["Allow"] == "GET"
    r = server.get("/no/such/endpoint")
    assert r.status_code == 404 and "error" in r.json()
    r = server.post("/v1/images/generations", data=b"x" * ((1 << 20) + 1), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"], r.text


def test_the_openai_client_uses_every_honoured_field(server, ckpt):
    server.update(ckpt.base, weight_version="openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    reply = client.images.generate(prompt="a red fox", model=str(ckpt.base), size="64x32", n=1, output_format="jpeg",
                                   output_compression=80, response_format="b64_json", moderation="auto", quality="auto",
                                   extra_body={"seed": 7, "num_inference_steps": 2})
    img = Image.open(io.BytesIO(base64.b64decode(reply.data[0].b64_json)))
    assert (img.format, img.size) == ("JPEG", (64, 32))
    assert reply.model_extra["id"] and reply.output_format == "jpeg"
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(prompt="a red fox", style="vivid", extra_body={"num_inference_steps": 2})
    assert "style" in str(bad.value)
    assert client.models.retrieve(str(ckpt.base)).id == str(ckpt.base)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")
