"""The A1111 routes over the built-in model: the images are the Python API's, bit for bit; img2img and
inpainting; the listings; model switching; png-info; and every kind of bad input answered with a 4xx
and a one-line message in A1111's error shape."""

import json

import numpy as np
import pytest
from PIL import Image
from serve_util import b64_png, decode, pixels, png_claiming

from fewstep.loading.hub import ASSETS
from fewstep.serve.limits import MAX_WORK
from fewstep.serve.catalog import BUILT_IN

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a red circle and a blue square"


def test_txt2img_is_the_python_api_image_bit_for_bit(client, pipe):
    body = {"prompt": PROMPT, "negative_prompt": "green", "seed": 7, "steps": 2, "batch_size": 2, "n_iter": 2,
            "sampler_name": "Euler a", "scheduler": "Karras", "cfg_scale": 2.5, "width": 64, "height": 64}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    want = pipe(PROMPT, "green", seed=7, steps=2, num_images=4, batch_size=2, sampler="euler_a",
                sigma_schedule="karras", guidance=2.5, width=64, height=64, progress=False)
    assert r.json()["images"] == [b64_png(im) for im in want]  # same pixels, same parameters chunk
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
    assert info["infotexts"] == [im.info["parameters"] for im in want]
    assert info["infotexts"][1] == ("a red circle and a blue square\nNegative prompt: green\nSteps: 2, Sampler: "
                                    "Euler a, Schedule type: Karras, CFG scale: 2.5, Seed: 8, Size: 64x64, "
                                    "Model: shapes-turbo")
    assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["width"], info["height"]) == \
        ("Euler a", 2, 2.5, 64, 64)
    assert info["all_prompts"] == [PROMPT] * 4 and info["ignored"] == [] and info["interrupted"] is False
    assert r.json()["parameters"] == body
    assert decode(r.json()["images"][3]).info["parameters"] == want[3].info["parameters"]


def test_the_models_defaults_and_a_random_seed_reported_in_info(client, pipe):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": -1})
    info = json.loads(r.json()["info"])
    assert 0 <= info["seed"] < 2**32 and (info["steps"], info["width"], info["sampler_name"]) == (4, 128, "LCM")
    want = pipe(PROMPT, seed=info["seed"], progress=False)[0]
    assert np.array_equal(pixels(decode(r.json()["images"][0])), pixels(want))


def test_sampler_names_of_a1111_and_fewstep_and_old_karras_names(client):
    infos = [json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 64, "height": 64,
                                                                **extra}).json()["info"])["infotexts"][0]
             for extra in ({"sampler_name": "DPM++ 2M Karras"}, {"sampler_name": "dpmpp_2m", "scheduler": "karras"},
                           {"sampler_index": "Euler", "scheduler": "SGM Uniform"}, {"scheduler": "automatic"})]
    assert [i.split("Steps: 1, ")[1].split(", CFG")[0] for i in infos] == [
        "Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: DPM++ 2M, Schedule type: Karras",
        "Sampler: Euler, Schedule type: SGM Uniform", "Sampler: LCM"]


def test_fields_fewstep_does_not_act_on_are_listed_as_ignored_never_refused(client):
    body = {"prompt": "a", "steps": 1, "width": 64, "height": 64, "enable_hr": True, "hr_scale": 2.0,
            "restore_faces": True, "styles": ["x"], "my_extension": {"a": 1}, "eta": 0.5, "tiling": False,
            "s_noise": 1.0, "subseed": -1, "override_settings": {"sd_vae": "x", "CLIP_stop_at_last_layers": 2},
            "alwayson_scripts": {}, "save_images": True, "send_images": False}
    r = client.post("/sdapi/v1/txt2img", json=body)
    info = json.loads(r.json()["info"])
    assert info["ignored"] == ["enable_hr", "eta", "my_extension", "override_settings.sd_vae", "restore_faces",
                               "save_images", "styles"]
    assert r.json()["images"] == [] and "Clip skip: 2" in info["infotexts"][0]


def test_img2img_and_inpainting_are_the_python_api_images(client, pipe):
    source = pipe(PROMPT, seed=1, progress=False)[0]
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (0, 0, 64, 128))
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a green triangle", "init_images": [b64_png(source)],
                                               "denoising_strength": 0.5, "seed": 3})
    want = pipe("a green triangle", image=source, strength=0.5, seed=3, progress=False)[0]
    assert r.status_code == 200, r.text
    assert r.json()["images"] == [b64_png(want)] and "Denoising strength: 0.5" in want.info["parameters"]
    assert "init_images" not in r.json()["parameters"]
    body = {"prompt": "a green triangle", "init_images": ["data:image/png;base64," + b64_png(source)],
            "mask": b64_png(mask), "seed": 3, "inpainting_fill": 2, "mask_blur": 4, "inpaint_full_res_padding": 8}
    r = client.post("/sdapi/v1/img2img", json=body)
    want = pipe("a green triangle", image=source, mask_image=mask, seed=3, mask_blur=4, overlay=True,
                masked_content="latent noise", padding_mask_crop=8, progress=False)[0]
    got = decode(r.json()["images"][0])
    assert np.array_equal(pixels(got), pixels(want))
    assert np.array_equal(pixels(got)[:, 80:], pixels(source)[:, 80:])  # beyond the blurred edge: the source
    assert not np.array_equal(pixels(got)[:, :50], pixels(source)[:, :50])


def test_inpainting_fill_zero_and_extra_init_images_are_reported(client, pipe):
    source = pipe(PROMPT, seed=1, steps=1, width=64, height=64, progress=False)[0]
    mask = Image.new("L", source.size, 255)
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a", "init_images": [b64_png(source)] * 2, "steps": 1,
                                               "mask": b64_png(mask), "inpainting_mask_invert": 0,
                                               "include_init_images": True})
    assert json.loads(r.json()["info"])["ignored"] == ["init_images[1:]", "inpainting_fill"]
    assert len(r.json()["parameters"]["init_images"]) == 2


def test_listings(client, tmp_path, make_client):
    assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == list(BUILT_IN)
    samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M", "LCM", "DDIM"} <= set(samplers) and len(samplers) == 14
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == [
        "Automatic", "Karras", "Exponential", "SGM Uniform", "Align Your Steps"]
    assert client.get("/sdapi/v1/loras").json() == []
    (tmp_path / "circles.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    loras = make_client(lora_dir=tmp_path).get("/sdapi/v1/loras").json()
    assert [(x["name"], x["path"]) for x in loras] == [("circles", str(tmp_path / "circles.safetensors"))]
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200


def test_options_switch_the_model(client):
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-turbo"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-teacher [abc]"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-teacher"
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 64, "height": 64})
    assert json.loads(r.json()["info"])["infotexts"][0].endswith("Model: shapes-teacher")
    client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shapes-turbo", "CLIP_stop_at_last_layers": 2})
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2


def test_model_names_never_reach_paths_or_pickles(tmp_path, make_client):
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    (tmp_path / "elsewhere").symlink_to(ASSETS / "shapes-turbo")  # a diffusers folder, outside models_dir
    (tmp_path / "outside.safetensors").symlink_to("/etc/hostname")
    client = make_client(models_dir=tmp_path)
    assert [m["title"] for m in client.get("/sdapi/v1/sd-models").json()] == list(BUILT_IN)
    for name, message in [("../shapes-turbo", "model '../shapes-turbo': give a model's name from /sdapi/v1/sd-models, "
                                              "not a path"),
                          ("/etc/passwd", "model '/etc/passwd': give a model's name from /sdapi/v1/sd-models, not a "
                                          "path"),
                          ("old.ckpt", "unknown model 'old.ckpt'; choose one of: shapes-turbo, shapes-teacher"),
                          ("outside.safetensors", "unknown model 'outside.safetensors'; choose one of: shapes-turbo, "
                                                  "shapes-teacher")]:
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert (r.status_code, r.json()["detail"]) == (422, message)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-turbo"


def test_png_info_reads_back_the_parameters(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a, b", "negative_prompt": "c", "seed": 5, "steps": 1})
    info = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
    assert info["info"] == json.loads(r.json()["info"])["infotexts"][0] and info["items"] == {}
    assert info["parameters"] == {"Prompt": "a, b", "Negative prompt": "c", "Steps": "1", "Sampler": "LCM",
                                  "CFG scale": "0", "Seed": "5", "Size": "128x128", "Model": "shapes-turbo",
                                  "Size-1": 128, "Size-2": 128}
    plain = b64_png(Image.new("RGB", (8, 8)), parameters="")
    assert client.post("/sdapi/v1/png-info", json={"image": plain}).json()["parameters"] == {}


TOO_BIG = f"more than {2**26} pixels"  # fewstep.edits.MAX_PIXELS
BAD = [  # (route, body, status, the one-line message)
    ("txt2img", {}, 422, "prompt: Field required"),
    ("txt2img", {"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ("txt2img", [1, 2], 422, "Input should be a valid dictionary or object to extract fields from"),
    ("txt2img", {"prompt": "a", "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
    ("txt2img", {"prompt": "a", "steps": "many"}, 422,
     "steps: Input should be a valid integer, unable to parse string as an integer"),
    ("txt2img", {"prompt": "a", "steps": 10**6}, 422, "128x128 x 1 images x 1000000 steps is 16384000000 pixel-steps, "
     f"more than this server's limit of {MAX_WORK}: ask for less"),
    ("txt2img", {"prompt": "a", "width": 100}, 422, "width: Input should be a multiple of 8"),
    ("txt2img", {"prompt": "a", "seed": -2}, 422, "seed: Input should be greater than or equal to -1"),
    ("txt2img", {"prompt": "a", "seed": 2**64}, 422,
     "seed=18446744073709551616 must be a whole number from 0 to 2**64 - 1 (image i uses seed + i), or -1 for a "
     "random one"),
    ("txt2img", {"prompt": "a " * 10**5}, 422, "prompt: String should have at most 20000 characters"),
    ("txt2img", {"prompt": "a", "sampler_name": "DPM fast"}, 422, "unknown sampler_name 'DPM fast'; choose one of: "
     "Euler, Euler a, Heun, LMS, DPM2, DPM2 a, DPM++ 2M, DPM++ 2M SDE, DPM++ SDE, UniPC, PLMS, DDIM, LCM"),
    ("txt2img", {"prompt": "a", "scheduler": "Beta"}, 422, "unknown scheduler 'Beta'; choose one of: Automatic, "
     "Karras, Exponential, SGM Uniform, Align Your Steps"),
    ("txt2img", {"prompt": "a", "override_settings": {"CLIP_stop_at_last_layers": "x"}}, 422,
     "override_settings.CLIP_stop_at_last_layers='x' must be a whole number from 1 to 12"),
    ("txt2img", {"prompt": "a", "cfg_scale": "NaN"}, 422, "cfg_scale: Input should be a finite number"),
    ("img2img", {"prompt": "a"}, 422, "init_images: Field required"),
    ("img2img", {"prompt": "a", "init_images": ["%%%"]}, 422,
     "init_images[0] is not valid base64 (Only base64 data is allowed)"),
    ("img2img", {"prompt": "a", "init_images": ["aGVsbG8="]}, 422,
     "init_images[0] is not an image fewstep can read (UnidentifiedImageError)"),
    ("img2img", {"prompt": "a", "init_images": [png_claiming(20000, 20000)]}, 422,
     f"init_images[0] has {TOO_BIG}"),
    ("img2img", {"prompt": "a", "init_images": [png_claiming(9000, 8000)]}, 422,
     f"init_images[0] is 9000x8000: {TOO_BIG}"),
    ("img2img", {"prompt": "a", "init_images": [png_claiming(8, 8)]}, 422,
     "init_images[0] is not an image fewstep can read (OSError)"),
    ("img2img", {"prompt": "a", "init_images": [b64_png(Image.new("RGB", (64, 64)))], "denoising_strength": 2}, 422,
     "denoising_strength: Input should be less than or equal to 1"),
    ("img2img", {"prompt": "a", "init_images": [b64_png(Image.new("RGB", (64, 64)))],
                 "mask": b64_png(Image.new("L", (64, 64)))}, 422,
     "mask_image is all black (nothing to repaint): paint the region to repaint white"),
    ("png-info", {"image": "aGVsbG8="}, 422, "image is not an image fewstep can read (UnidentifiedImageError)"),
    ("options", {"sd_model_checkpoint": "nope"}, 422, "unknown model 'nope'; choose one of: shapes-turbo, "
     "shapes-teacher"),
]


@pytest.mark.parametrize("route, body, status, message", BAD, ids=[f"{r}-{m[:30]}" for r, _, _, m in BAD])
def test_bad_input_is_a_4xx_with_one_line_in_a1111s_shape(client, route, body, status, message):
    r = client.post(f"/sdapi/v1/{route}", json=body)
    assert r.status_code == status
    assert r.json() == {"error": r.json()["error"], "detail": message, "body": "", "errors": message}


def test_malformed_json_unknown_routes_and_methods(client):
    r = client.post("/sdapi/v1/txt2img", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["detail"]) == (422, "malformed JSON body: Expecting value")
    r = client.get("/sdapi/v1/nothing")
    assert (r.status_code, r.json()) == (404, {"error": "HTTPException", "detail": "Not Found", "body": "",
                                               "errors": "Not Found"})
    assert client.get("/sdapi/v1/txt2img").json()["detail"] == "Method Not Allowed"


def test_request_bodies_over_the_limit_are_413(make_client):
    client = make_client(max_body=1000)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a" * 2000})
    assert (r.status_code, r.json()["detail"]) == (413, "request body over 1000 bytes")
    chunks = (b'{"prompt": "' + b"a" * 500, b"a" * 600 + b'"}')
    r = client.post("/sdapi/v1/txt2img", content=iter(chunks), headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["detail"]) == (413, "request body over 1000 bytes")
    small = (b'{"prompt": "a", ', b'"steps": 1, "width": 64, "height": 64}')
    r = client.post("/sdapi/v1/txt2img", content=iter(small), headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_basic_auth_on_every_route(make_client):
    client = make_client(api_auth="ann:s3cret,bob:pw:with:colons")
    paths = client.app.openapi()["paths"]
    routes = [(m.upper(), p) for p, methods in paths.items() for m in methods] + [
        ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc"), ("GET", "/")]
    assert len(routes) == 17
    for method, path in routes:
        for auth in (None, ("ann", "wrong"), ("eve", "s3cret")):
            r = client.request(method, path, auth=auth)
            assert (r.status_code, r.json()["detail"]) == (401, "Incorrect username or password"), (method, path)
            assert r.headers["www-authenticate"] == "Basic"
    assert client.get("/sdapi/v1/options", auth=("ann", "s3cret")).status_code == 200
    assert client.get("/sdapi/v1/samplers", auth=("bob", "pw:with:colons")).status_code == 200
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Basic !!"}).status_code == 401
