"""Tests of `nfnet_keras.serving`: REST and gRPC clients against loopback stand-ins of TF Serving.

The stand-ins serve the exported SavedModel (loaded with `tf.saved_model.load`)
through TF Serving's own gRPC service definition and its REST JSON format. They
listen on 127.0.0.1 only, on a free port, with two worker threads, and stop
themselves after `SERVER_LIFETIME` seconds even if a test run is interrupted.
"""

import http.server
import json
import re
import threading
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
import keras
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import nfnet_keras
from nfnet_keras import serving
from nfnet_keras.data import CLASS_NAMES
from nfnet_keras.export import export_saved_model

MODEL_NAME = "nfnet"
SERVER_LIFETIME = 300.0  # seconds


def _first_line(error):
    """The line of a TensorFlow error that says what is wrong (its graph context dropped)."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    text = getattr(error, "message", None) or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if not line.startswith(noise)), type(error).__name__)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    keras.utils.set_random_seed(1)
    model = nfnet_keras.build_model("tiny")
    return export_saved_model(model, MODEL_NAME, base_dir=str(tmp_path_factory.mktemp("served")))


@pytest.fixture(scope="module")
def loaded(saved_model):
    return tf.saved_model.load(saved_model)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def direct(loaded, images):
    """What the SavedModel itself answers for `images`."""
    out = loaded.signatures["serving_default"](image=tf.constant(images))
    return {k: v.numpy() for k, v in out.items()}


# === Loopback gRPC server (TF Serving's PredictionService) ===


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`Predict` as TF Serving answers it, on a loaded SavedModel."""

    def __init__(self, name, loaded):
        self.name = name
        self.signatures = loaded.signatures

    def Predict(self, request, context):
        if request.model_spec.name != self.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({request.model_spec.name})")
        key = request.model_spec.signature_name or "serving_default"
        if key not in self.signatures:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{key}" not found.')
        try:
            inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
            outputs = self.signatures[key](**inputs)
        except (TypeError, ValueError, tf.errors.InvalidArgumentError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _first_line(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for k, v in outputs.items():
            response.outputs[k].CopyFrom(tf.make_tensor_proto(v.numpy()))
        return response


@pytest.fixture(scope="module")
def grpc_target(loaded):
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        maximum_concurrent_rpcs=8,
        options=[("grpc.max_receive_message_length", serving.MAX_MESSAGE_BYTES)],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(MODEL_NAME, loaded), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    deadline = threading.Timer(SERVER_LIFETIME, server.stop, args=(0,))
    deadline.daemon = True
    deadline.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        deadline.cancel()
        server.stop(grace=None).wait(10)


# === Loopback REST server (TF Serving's JSON API) ===

_PREDICT_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/(\d+))?:predict")


def _rest_handler(loaded):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def _reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            match = _PREDICT_PATH.fullmatch(self.path)
            if not match or match.group(1) != MODEL_NAME:
                return self._reply(404, {"error": f"Servable not found for request: {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fn = loaded.signatures[body.get("signature_name", "serving_default")]
                # Row format: one object per instance, keyed by input name.
                values = np.asarray([instance["image"] for instance in body["instances"]])
                if values.dtype.kind not in "iu" or values.min() < 0 or values.max() > 255:
                    raise ValueError("JSON values do not fit the input's dtype uint8")
                out = fn(image=tf.constant(values, tf.uint8))
            except (KeyError, TypeError, ValueError, tf.errors.InvalidArgumentError) as e:
                return self._reply(400, {"error": _first_line(e)})
            out = {k: v.numpy().tolist() for k, v in out.items()}
            rows = [dict(zip(out, row)) for row in zip(*out.values())]
            self._reply(200, {"predictions": rows})

    return Handler


@pytest.fixture(scope="module")
def rest_port(loaded):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(loaded))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = threading.Timer(SERVER_LIFETIME, server.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        yield server.server_address[1]
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(10)


# === Request building ===


def test_as_image_batch_adds_a_batch_axis_and_checks(images):
    assert serving.as_image_batch(images[0]).shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(serving.as_image_batch(images), images)
    with pytest.raises(ValueError, match="must be uint8 raw pixels.*got float32.*do not scale"):
        serving.as_image_batch(images.astype("float32") / 255)
    with pytest.raises(ValueError, match=r"shape \(batch, 32, 32, 3\).*got \(2, 28, 28, 3\)"):
        serving.as_image_batch(np.zeros((2, 28, 28, 3), np.uint8))


def test_rest_request_is_row_format(images):
    body = serving.rest_request(images[:2])
    assert set(body) == {"signature_name", "instances"}
    assert body["signature_name"] == "serving_default"
    assert len(body["instances"]) == 2
    assert np.array_equal(np.asarray(body["instances"][1]["image"], np.uint8), images[1])
    assert json.loads(json.dumps(body)) == body  # plain JSON ints


def test_rest_url():
    assert serving.rest_url("nfnet") == "http://localhost:8501/v1/models/nfnet:predict"
    assert (
        serving.rest_url("nfnet", "10.0.0.2", 9000, version=3)
        == "http://10.0.0.2:9000/v1/models/nfnet/versions/3:predict"
    )


def test_grpc_request_proto(images):
    request = serving.grpc_request(images, "nfnet", version=7)
    assert request.model_spec.name == "nfnet"
    assert request.model_spec.signature_name == "serving_default"
    assert request.model_spec.version.value == 7
    tensor = request.inputs["image"]
    assert tensor.dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in tensor.tensor_shape.dim] == [5, 32, 32, 3]
    np.testing.assert_array_equal(tf.make_ndarray(tensor), images)
    assert not serving.grpc_request(images, "nfnet").model_spec.HasField("version")


# === Response parsing ===


def test_parse_rest_response_row_and_columnar():
    p = [0.1] * 9 + [0.1]
    p[3] = 0.5
    row = json.dumps({"predictions": [{"probabilities": p, "class_id": 3}]})
    (pred,) = serving.parse_rest_response(row)
    assert (pred.class_id, pred.class_name, pred.probability) == (3, "cat", 0.5)
    assert pred.probabilities.dtype == np.float32 and pred.probabilities.shape == (10,)
    (col,) = serving.parse_rest_response({"outputs": {"probabilities": [p], "class_id": [3]}})
    assert col.class_name == "cat"


@pytest.mark.parametrize(
    "body, match",
    [
        ({"error": "Servable not found"}, "Servable not found"),
        ("<html>", "not JSON"),
        ({"predictions": [{"scores": [0.1] * 10}]}, "lacks 'probabilities'"),
        ({"predictions": [{"probabilities": [0.5, 0.5], "class_id": 0}]}, r"shape \(batch, 10\)"),
        ({"result": 1}, "expected 'predictions' or 'outputs'"),
    ],
)
def test_parse_rest_response_errors(body, match):
    with pytest.raises(serving.ServingError, match=match):
        serving.parse_rest_response(body)


def test_read_class_names(saved_model):
    assert serving.read_class_names(saved_model) == CLASS_NAMES


# === Round trips ===


def _assert_matches(predictions, direct):
    assert [p.class_id for p in predictions] == direct["class_id"].tolist()
    assert [p.class_name for p in predictions] == [CLASS_NAMES[c] for c in direct["class_id"]]
    np.testing.assert_array_equal(np.stack([p.probabilities for p in predictions]), direct["probabilities"])


def test_grpc_round_trip(grpc_target, images, direct):
    predictions = serving.predict_grpc(grpc_target, images, MODEL_NAME, timeout=30)
    _assert_matches(predictions, direct)


def test_rest_round_trip(rest_port, images, direct):
    url = serving.rest_url(MODEL_NAME, "127.0.0.1", rest_port)
    _assert_matches(serving.predict_rest(url, images, timeout=30), direct)


@pytest.mark.parametrize(
    "tensor, match",
    [
        (np.zeros((1, 32, 32, 3), np.float32), "expected to be a uint8 tensor but is a float"),
        (np.zeros((1, 28, 28, 3), np.uint8), r"not compatible with expected shape \[\?,32,32,3\]"),
    ],
)
def test_grpc_bad_input_is_invalid_argument_and_server_survives(grpc_target, images, direct, tensor, match):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(tensor))  # bypasses the client's checks
    with grpc.insecure_channel(grpc_target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(match, error.value.details()), error.value.details()
    _assert_matches(serving.predict_grpc(grpc_target, images, MODEL_NAME, timeout=30), direct)


def test_grpc_unknown_model_is_a_serving_error(grpc_target, images):
    with pytest.raises(serving.ServingError, match="NOT_FOUND.*Servable not found"):
        serving.predict_grpc(grpc_target, images, "other", timeout=30)


def test_rest_errors_are_serving_errors(rest_port, images):
    url = serving.rest_url("other", "127.0.0.1", rest_port)
    with pytest.raises(serving.ServingError, match="HTTP 404.*Servable not found"):
        serving.predict_rest(url, images, timeout=30)
    request = {"instances": [{"image": (images[0] / 255).tolist()}]}  # floats for a uint8 input
    req = urllib.request.Request(
        serving.rest_url(MODEL_NAME, "127.0.0.1", rest_port), data=json.dumps(request).encode()
    )
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(req, timeout=30)
    assert error.value.code == 400 and "uint8" in json.loads(error.value.read())["error"]


# === Command line ===


def test_cli_classifies_image_files(grpc_target, rest_port, images, direct, tmp_path, capsys):
    from PIL import Image

    paths = []
    for i, image in enumerate(images[:2]):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(image).save(paths[-1])
    host, port = grpc_target.split(":")
    assert serving.main(["--model-name", MODEL_NAME, "--host", host, "--port", port, *paths]) == 0
    grpc_lines = capsys.readouterr().out.splitlines()
    assert grpc_lines == [
        f"{p}: {CLASS_NAMES[c]} (p={direct['probabilities'][i, c]:.3f})"
        for i, (p, c) in enumerate(zip(paths, direct["class_id"]))
    ]
    argv = ["--model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(rest_port), "--protocol", "rest"]
    assert serving.main(argv + paths) == 0
    assert capsys.readouterr().out.splitlines() == grpc_lines


def test_cli_reports_errors_in_one_line(grpc_target, tmp_path, capsys):
    with pytest.raises(SystemExit):
        serving.main(["--model-name", MODEL_NAME])
    assert "pass image files or --cifar-test N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        serving.main(["--model-name", MODEL_NAME, str(tmp_path / "absent.png")])
    assert "no such image file" in capsys.readouterr().err
    (tmp_path / "x.png").write_bytes(b"not a png")
    host, port = grpc_target.split(":")
    with pytest.raises(SystemExit):
        serving.main(["--model-name", MODEL_NAME, "--host", host, "--port", port, str(tmp_path / "x.png")])
    assert "x.png is not a readable PNG/JPEG image" in capsys.readouterr().err
    from PIL import Image

    Image.new("RGB", (64, 48)).save(tmp_path / "big.png")  # resized to 32x32
    assert serving.main(["--model-name", "other", "--host", host, "--port", port, str(tmp_path / "big.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: NOT_FOUND") and "\n" not in err


# === The benchmark runs ===


def test_serving_benchmark_smoke(tmp_path, capsys):
    from benchmarks import serving as benchmark

    payload = benchmark.main(["--smoke", "--quiet", "--out-dir", str(tmp_path)])
    with open(tmp_path / "serving_smoke.json") as f:
        saved = json.load(f)
    assert saved["benchmark"] == "serving" and saved["preset"] == "tiny"
    for key in ("p50", "p99"):
        assert 0 < saved["latency_batch1_ms"][key]["min"] <= saved["latency_batch1_ms"][key]["median"]
    assert saved["serving_images_per_s"]["16"]["min"] > 0
    assert saved["training_images_per_s"]["min"] > 0
    assert saved["serving_over_training"]["16"]["n"] == 2
    assert set(saved["targets_met"]) == {"p50", "throughput"}
    assert payload["json_path"] == str(tmp_path / "serving_smoke.json")
    assert "batch-1 p50 ms" in capsys.readouterr().out
