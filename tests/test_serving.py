"""Tests of `nfnet_keras.serving`: REST and gRPC clients against loopback servers.

Two kinds of server, both on 127.0.0.1 only, on a free port, stopping
themselves after `SERVER_LIFETIME` seconds even if a test run is interrupted:

- stand-ins of TF Serving that serve the exported SavedModel (loaded with
  `tf.saved_model.load`) through TF Serving's own gRPC service definition and
  its REST JSON format: the round trips;
- scripted servers that answer whatever a test tells them to (a status, a
  body, a gRPC error, a malformed response, a delay) and record the request:
  what the client sends, and what it returns or raises for a given answer.
"""

import contextlib
import http.server
import json
import re
import socket
import sys
import threading
import time
import urllib.error
from concurrent import futures

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

import nfnet_keras
from nfnet_keras import serving
from nfnet_keras.contract import CLASS_NAMES
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
            details = f"Servable not found for request: Latest({request.model_spec.name})"
            context.abort(grpc.StatusCode.NOT_FOUND, details)
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


@contextlib.contextmanager
def loopback_grpc(servicer, **server_kwargs):
    """A gRPC PredictionService on 127.0.0.1 serving `servicer`; yields its port. Stopped after the block,
    or after SERVER_LIFETIME seconds whatever happens."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), **server_kwargs)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    deadline = threading.Timer(SERVER_LIFETIME, server.stop, args=(0,))
    deadline.daemon = True
    deadline.start()
    try:
        yield port
    finally:
        deadline.cancel()
        server.stop(grace=None).wait(10)


@pytest.fixture(scope="module")
def grpc_target(loaded):
    with loopback_grpc(PredictionService(MODEL_NAME, loaded), maximum_concurrent_rpcs=8,
                       options=[("grpc.max_receive_message_length", serving.MAX_MESSAGE_BYTES)]) as port:
        yield f"127.0.0.1:{port}"


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
    with pytest.raises(ValueError, match="uint8 raw pixels.*float32.*do not scale"):
        serving.as_image_batch(images.astype("float32") / 255)
    with pytest.raises(ValueError, match=r"shape.*got \(2, 28, 28, 3\)"):
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


def test_grpc_round_trip_after_a_failed_call(grpc_target, images, direct):
    # The stand-in refuses an unknown model; the client's channel is per call,
    # so the next call still gets its answer.
    with pytest.raises(serving.ServingError):
        serving.predict_grpc(grpc_target, images, "other", timeout=30)
    _assert_matches(serving.predict_grpc(grpc_target, images, MODEL_NAME, timeout=30), direct)


# === Scripted servers: what the client sends, and does with each answer ===


def _probabilities(n, seed=0):
    p = np.random.default_rng(seed).uniform(0.01, 1.0, (n, 10)).astype(np.float32)
    return p / p.sum(axis=1, keepdims=True)


class ScriptedREST:
    """Answers every POST with `status`, `body` (bytes) and `content_type` after `delay` s."""

    def __init__(self):
        self.requests = []
        self.answer(200, b"{}")

    def answer(self, status, body, content_type="application/json", delay=0.0):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.status, self.body, self.content_type, self.delay = status, body, content_type, delay

    def handler(self):
        script = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                data = self.rfile.read(int(self.headers["Content-Length"]))
                script.requests.append(dict(path=self.path, headers=dict(self.headers), body=data))
                time.sleep(script.delay)
                self.send_response(script.status)
                self.send_header("Content-Type", script.content_type)
                self.send_header("Content-Length", str(len(script.body)))
                self.end_headers()
                self.wfile.write(script.body)

        return Handler


@pytest.fixture(scope="module")
def scripted_rest():
    script = ScriptedREST()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), script.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = threading.Timer(SERVER_LIFETIME, server.shutdown)
    deadline.daemon = True
    deadline.start()
    try:
        script.url = serving.rest_url("m", "127.0.0.1", server.server_address[1], version=2)
        yield script
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_rest_client_sends_row_format_json_and_reads_predictions(scripted_rest, images):
    p = _probabilities(2)
    class_ids = [7, 2]  # not the argmax: the client must take the server's class id
    scripted_rest.answer(200, {"predictions": [{"probabilities": p[i].tolist(), "class_id": class_ids[i]}
                                               for i in range(2)]})
    predictions = serving.predict_rest(scripted_rest.url, images[:2], timeout=30)
    sent = scripted_rest.requests[-1]
    assert sent["path"] == "/v1/models/m/versions/2:predict"
    assert sent["headers"]["Content-Type"] == "application/json"
    body = json.loads(sent["body"])
    assert body["signature_name"] == "serving_default"
    np.testing.assert_array_equal(np.asarray([i["image"] for i in body["instances"]], np.uint8), images[:2])
    assert [(q.class_id, q.class_name) for q in predictions] == [(7, "horse"), (2, "bird")]
    assert [q.probability for q in predictions] == pytest.approx([p[0, 7], p[1, 2]])
    np.testing.assert_array_equal(np.stack([q.probabilities for q in predictions]), p)


@pytest.mark.parametrize(
    "status, body, content_type, message",
    [
        # TF Serving's error body: the client reports the reason, unwrapped from its JSON.
        (404, {"error": "model m not loaded"}, "application/json", "HTTP 404 from {url}: model m not loaded"),
        # Anything else (a proxy's page, a JSON array): the body as text.
        (502, b"<html>bad gateway</html>", "text/html", "HTTP 502 from {url}: <html>bad gateway</html>"),
        (500, [1, 2], "application/json", "HTTP 500 from {url}: [1, 2]"),
        # A 200 that is no prediction.
        (200, b"<html>ok</html>", "text/html", "the server's answer is not JSON"),
        (200, {"error": "overloaded"}, "application/json", "overloaded"),
        (200, {"result": 1}, "application/json", "expected 'predictions' or 'outputs', got keys ['result']"),
        (200, {"predictions": [{"probabilities": [0.5] * 9, "class_id": 0}]}, "application/json",
         "expected probabilities of shape (batch, 10), got (1, 9)"),
    ],
    ids=["error_json", "html", "json_array", "200_not_json", "200_error", "200_no_predictions", "200_nine_classes"],
)
def test_rest_client_raises_serving_error_for_each_bad_answer(scripted_rest, images, status, body,
                                                              content_type, message):
    scripted_rest.answer(status, body, content_type)
    with pytest.raises(serving.ServingError) as error:
        serving.predict_rest(scripted_rest.url, images[:1], timeout=30)
    assert message.format(url=scripted_rest.url) in str(error.value)
    if status != 200:
        assert isinstance(error.value.__cause__, urllib.error.HTTPError)
        assert error.value.__cause__.code == status


def test_rest_client_reads_the_columnar_answer(scripted_rest, images):
    p = _probabilities(2, seed=1)
    scripted_rest.answer(200, {"outputs": {"probabilities": p.tolist(), "class_id": [3, 9]}})
    predictions = serving.predict_rest(scripted_rest.url, images[:2], timeout=30)
    assert [q.class_name for q in predictions] == ["cat", "truck"]


def test_rest_client_times_out_with_a_serving_error(scripted_rest, images):
    scripted_rest.answer(200, {"predictions": []}, delay=2.0)
    start = time.perf_counter()
    with pytest.raises(serving.ServingError, match=f"cannot reach {re.escape(scripted_rest.url)}"):
        serving.predict_rest(scripted_rest.url, images[:1], timeout=0.3)
    assert time.perf_counter() - start < 1.5


def test_rest_client_without_a_server_raises_serving_error(images):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = serving.rest_url("m", "127.0.0.1", port)
    with pytest.raises(serving.ServingError, match=f"cannot reach {re.escape(url)}.*is the server up"):
        serving.predict_rest(url, images[:1], timeout=5)


class ScriptedPrediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`Predict` answers with `response`, or aborts with (`code`, `details`), after `delay` s."""

    def __init__(self):
        self.requests = []
        self.answer()

    def answer(self, response=None, code=None, details="", delay=0.0):
        self.response, self.code, self.details, self.delay = response, code, details, delay

    def Predict(self, request, context):
        self.requests.append(request)
        time.sleep(self.delay)
        if self.code is not None:
            context.abort(self.code, self.details)
        return self.response


def _response(**outputs):
    response = predict_pb2.PredictResponse()
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
    return response


@pytest.fixture(scope="module")
def scripted_grpc():
    script = ScriptedPrediction()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(script, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    deadline = threading.Timer(SERVER_LIFETIME, server.stop, args=(0,))
    deadline.daemon = True
    deadline.start()
    try:
        script.target = f"127.0.0.1:{port}"
        yield script
    finally:
        deadline.cancel()
        server.stop(grace=None).wait(10)


def test_grpc_client_sends_the_request_and_reads_the_response(scripted_grpc, images):
    p = _probabilities(3, seed=2)
    scripted_grpc.answer(_response(probabilities=p, class_id=np.array([0, 5, 9], np.int64)))
    predictions = serving.predict_grpc(scripted_grpc.target, images[:3], "m", version=4, timeout=30)
    sent = scripted_grpc.requests[-1]
    assert (sent.model_spec.name, sent.model_spec.signature_name, sent.model_spec.version.value) == (
        "m", "serving_default", 4)
    assert list(sent.inputs) == ["image"] and sent.inputs["image"].dtype == tf.uint8.as_datatype_enum
    np.testing.assert_array_equal(tf.make_ndarray(sent.inputs["image"]), images[:3])
    assert [(q.class_id, q.class_name) for q in predictions] == [(0, "airplane"), (5, "dog"), (9, "truck")]
    assert [q.probability for q in predictions] == pytest.approx([p[0, 0], p[1, 5], p[2, 9]])


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED],
)
def test_grpc_client_reports_the_status_and_details(scripted_grpc, images, code):
    scripted_grpc.answer(code=code, details="details from the server")
    with pytest.raises(serving.ServingError) as error:
        serving.predict_grpc(scripted_grpc.target, images[:1], "m", timeout=30)
    assert str(error.value) == f"{code.name} from {scripted_grpc.target}: details from the server"
    assert isinstance(error.value.__cause__, grpc.RpcError) and error.value.__cause__.code() == code


@pytest.mark.parametrize(
    "outputs, message",
    [
        (dict(probabilities=_probabilities(1)), r"lacks output\(s\) \['class_id'\]; got \['probabilities'\]"),
        (dict(probabilities=np.full((1, 9), 0.1, np.float32), class_id=np.array([0])),
         r"probabilities of shape \(batch, 10\), got \(1, 9\)"),
        (dict(probabilities=_probabilities(2), class_id=np.array([0])), "got 1 class ids for 2 images"),
    ],
    ids=["no_class_id", "nine_classes", "ids_and_rows_disagree"],
)
def test_grpc_client_rejects_a_malformed_response(scripted_grpc, images, outputs, message):
    scripted_grpc.answer(_response(**outputs))
    with pytest.raises(serving.ServingError, match=message):
        serving.predict_grpc(scripted_grpc.target, images[:2], "m", timeout=30)


def test_grpc_client_deadline_is_a_serving_error(scripted_grpc, images):
    scripted_grpc.answer(_response(probabilities=_probabilities(1), class_id=np.array([0])), delay=1.0)
    with pytest.raises(serving.ServingError, match=f"^DEADLINE_EXCEEDED from {scripted_grpc.target}"):
        serving.predict_grpc(scripted_grpc.target, images[:1], "m", timeout=0.2)


def test_grpc_client_without_a_server_raises_serving_error(images):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(serving.ServingError, match=f"^UNAVAILABLE from {target}"):
        serving.predict_grpc(target, images[:1], "m", timeout=5)


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


@pytest.mark.slow
def test_serving_benchmark_smoke(tmp_path, capsys):
    from benchmarks import serving as benchmark

    payload = benchmark.main(["--smoke", "--quiet", "--out-dir", str(tmp_path)])
    with open(tmp_path / "serving_smoke.json") as f:
        saved = json.load(f)
    assert payload["json_path"] == str(tmp_path / "serving_smoke.json")
    assert saved["benchmark"] == "serving" and saved["preset"] == "tiny"
    assert saved["params"] == nfnet_keras.build_model("tiny").count_params()
    latency = saved["latency_batch1_ms"]
    for key in ("p50", "p99"):
        assert latency[key]["n"] == 2 and 0 < latency[key]["min"] <= latency[key]["median"]
    # Per round, the 99th percentile of the same calls is at least their median.
    assert all(a <= b for a, b in zip(latency["p50"]["values"], latency["p99"]["values"]))
    serve, train = saved["serving_images_per_s"]["16"], saved["training_images_per_s"]
    assert serve["min"] > 0 and train["min"] > 0
    # The ratio is per round: serving over training of the same round (images/s rounded to 0.1).
    ratios = saved["serving_over_training"]["16"]["values"]
    assert ratios == pytest.approx([a / b for a, b in zip(serve["values"], train["values"])], rel=1e-2)
    assert saved["targets_met"] == {
        "p50": latency["p50"]["median"] <= saved["targets"]["p50_ms"],
        "throughput": saved["serving_over_training"]["16"]["median"]
        >= saved["targets"]["serving_16_over_training"],
    }
    # The printed table shows the JSON's figures.
    out = capsys.readouterr().out
    assert f"{latency['p50']['min']:.2f} / {latency['p50']['median']:.2f}" in out
    assert f"{serve['min']:.0f} / {serve['median']:.0f}" in out


# === Command line: labels, exit statuses ===


class EchoPrediction(prediction_service_pb2_grpc.PredictionServiceServicer):
    """`Predict` answers each image with class `first pixel % 10` and that class's probability `first pixel / 256`."""

    def Predict(self, request, context):
        first = tf.make_ndarray(request.inputs["image"])[:, 0, 0, 0].astype(np.int64)
        probabilities = np.zeros((len(first), 10), np.float32)
        probabilities[np.arange(len(first)), first % 10] = first / 256
        return _response(probabilities=probabilities, class_id=first % 10)


@pytest.fixture(scope="module")
def echo_grpc():
    with loopback_grpc(EchoPrediction()) as port:
        yield "127.0.0.1", str(port)


def _image_with_first_pixel(value):
    image = np.full((32, 32, 3), 200, np.uint8)
    image[0, 0, 0] = value
    return image


def test_cli_labels_every_input_with_its_own_prediction(echo_grpc, tmp_path, capsys):
    from PIL import Image

    np.save(tmp_path / "a.npy", np.stack([_image_with_first_pixel(v) for v in (11, 22, 33)]))
    (tmp_path / "folder").mkdir()
    for name, value in (("y.png", 77), ("x.png", 66)):
        Image.fromarray(_image_with_first_pixel(value)).save(tmp_path / "folder" / name)
    Image.fromarray(_image_with_first_pixel(44)).save(tmp_path / "img1.png")
    Image.fromarray(_image_with_first_pixel(55)).save(tmp_path / "img2.png")
    np.save(tmp_path / "b.npy", _image_with_first_pixel(98)[None])
    inputs = [str(tmp_path / name) for name in ("a.npy", "img1.png", "folder", "img2.png", "b.npy")]
    host, port = echo_grpc
    assert serving.main(["--model-name", "m", "--host", host, "--port", port, *inputs]) == 0
    a, img1, folder, img2, b = inputs
    expected = [(f"{a}[0]", 11), (f"{a}[1]", 22), (f"{a}[2]", 33), (img1, 44),
                (f"{folder}/x.png", 66), (f"{folder}/y.png", 77), (img2, 55), (f"{b}[0]", 98)]
    assert capsys.readouterr().out.splitlines() == [
        f"{label}: {CLASS_NAMES[v % 10]} (p={v / 256:.3f})" for label, v in expected
    ]


def test_cli_exit_status_tells_a_server_error_from_no_server(grpc_target, images, tmp_path, capsys):
    np.save(tmp_path / "x.npy", images[:1])
    host, port = grpc_target.split(":")
    assert serving.main(["--model-name", "other", "--host", host, "--port", port, str(tmp_path / "x.npy")]) == 1
    assert capsys.readouterr().err == (
        f"error: NOT_FOUND from {grpc_target}: Servable not found for request: Latest(other)\n")
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        free = str(sock.getsockname()[1])
    assert serving.main(["--model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", free,
                         str(tmp_path / "x.npy")]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: UNAVAILABLE from 127.0.0.1:{free}: ") and err.count("\n") == 1
    argv = ["--model-name", MODEL_NAME, "--protocol", "rest", "--host", "127.0.0.1", "--port", free]
    assert serving.main(argv + [str(tmp_path / "x.npy")]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach http://127.0.0.1:{free}/v1/models/{MODEL_NAME}:predict (")
    assert err.endswith("; is the server up?\n") and err.count("\n") == 1


def test_cli_follows_the_served_models_image_size_and_class_names(scripted_grpc, scripted_rest, tmp_path, capsys):
    from PIL import Image

    (tmp_path / "pets" / "1" / "assets").mkdir(parents=True)  # the served export's version folder
    (tmp_path / "pets" / "1" / "assets" / "class_names.txt").write_text("cat\ndog\nfox\n")
    image = str(tmp_path / "a.png")
    Image.new("RGB", (64, 40), (9, 99, 199)).save(image)  # resized to 48 x 48: a uniform colour stays uniform
    p = np.array([[0.1, 0.2, 0.7]], np.float32)
    scripted_grpc.answer(_response(probabilities=p, class_id=np.array([2], np.int64)))
    host, port = scripted_grpc.target.split(":")
    argv = ["--model-name", "m", "--host", host, "--port", port, "--image-size", "48"]
    assert serving.main(argv + ["--class-names", str(tmp_path / "pets" / "1"), image]) == 0
    sent = tf.make_ndarray(scripted_grpc.requests[-1].inputs["image"])
    assert sent.shape == (1, 48, 48, 3) and (sent == np.array([9, 99, 199], np.uint8)).all()
    assert capsys.readouterr().out == f"{image}: fox (p=0.700)\n"
    # REST sends the same 48 x 48 image; the class_names.txt file itself names the classes too.
    scripted_rest.answer(200, {"predictions": [{"probabilities": p[0].tolist(), "class_id": 1}]})
    port = scripted_rest.url.split(":")[2].split("/")[0]
    rest = ["--model-name", "m", "--protocol", "rest", "--host", "127.0.0.1", "--port", port, "--image-size", "48"]
    names = str(tmp_path / "pets" / "1" / "assets" / "class_names.txt")
    assert serving.main(rest + ["--class-names", names, image]) == 0
    body = json.loads(scripted_rest.requests[-1]["body"])
    np.testing.assert_array_equal(np.asarray([i["image"] for i in body["instances"]], np.uint8), sent)
    assert capsys.readouterr().out == f"{image}: dog (p=0.200)\n"
    # Without --class-names, a model of other than 10 classes names them by id.
    assert serving.main(argv + [image]) == 0
    assert capsys.readouterr().out == f"{image}: 2 (p=0.700)\n"
    # Names of another model (CIFAR-10's ten): one line, exit 1.
    (tmp_path / "ten.txt").write_text("".join(f"{n}\n" for n in CLASS_NAMES))
    assert serving.main(argv + ["--class-names", str(tmp_path / "ten.txt"), image]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: expected probabilities of shape (batch, 10), got (1, 3): one per class name;")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image-size", "48", "{tmp}/small.npy"], "error: {tmp}/small.npy: expected shape N x 48 x 48 x 3, got "
                                                    "(2, 32, 32, 3)."),
        (["{tmp}/big.npy"], "error: {tmp}/big.npy: expected shape N x 32 x 32 x 3, got (2, 48, 48, 3)."),
        (["--image-size", "0", "{tmp}/small.npy"], "error: --image-size must be >= 1 (pixels), got 0."),
        (["--image-size", "48", "--cifar-test", "2"], "error: --cifar-test sends CIFAR-10's 32 x 32 test images, not "
                                                      "--image-size 48; send image files instead (resized to the "
                                                      "model's size)."),
        (["--class-names", "{tmp}/absent", "{tmp}/small.npy"], "error: --class-names {tmp}/absent: no such file; "
                                                               "pass the export's class_names.txt or its version "
                                                               "folder (e.g. saved_models/nfnet/1)."),
        (["--class-names", "{tmp}", "{tmp}/small.npy"], "error: --class-names {tmp}: holds neither "
                                                        "assets/class_names.txt nor class_names.txt; pass the "
                                                        "export's class_names.txt or its version folder (e.g. "
                                                        "saved_models/nfnet/1)."),
    ],
    ids=["array_smaller_than_the_model", "array_larger_than_cifar", "bad_size", "cifar_test_of_another_size",
         "no_class_names_file", "no_class_names_in_the_folder"],
)
def test_cli_refuses_images_of_another_size_in_one_line_before_sending(scripted_grpc, tmp_path, capsys, args,
                                                                       message):
    np.save(tmp_path / "small.npy", np.zeros((2, 32, 32, 3), np.uint8))
    np.save(tmp_path / "big.npy", np.zeros((2, 48, 48, 3), np.uint8))
    sent = len(scripted_grpc.requests)
    host, port = scripted_grpc.target.split(":")
    with pytest.raises(SystemExit) as exit_info:
        serving.main(["--model-name", "m", "--host", host, "--port", port]
                     + [a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message.format(tmp=tmp_path))
    assert len(scripted_grpc.requests) == sent  # nothing was sent


def test_cli_names_a_wrong_input_without_a_flag_it_does_not_have(tmp_path, capsys):
    (tmp_path / "list.txt").write_text("cat.png\n")
    with pytest.raises(SystemExit) as exit_:
        serving.main(["--model-name", MODEL_NAME, str(tmp_path / "list.txt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].endswith(
        f": error: {tmp_path / 'list.txt'}: expected a .npy array, a .png/.jpg file or a folder of them.")
    assert "--images" not in err[-1]
    np.save(tmp_path / "empty.npy", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_:
        serving.main(["--model-name", MODEL_NAME, str(tmp_path / "empty.npy")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: {tmp_path / 'empty.npy'} holds no images (an empty array); give at least one.")


def test_cli_help_names_the_command_typed_and_every_flag_has_help(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/home/u/nfnet-keras/.venv/bin/nfnet-serve-client", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        serving.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: nfnet-serve-client [-h]")
    flat = " ".join(text.split())
    assert "--host HOST the TF Serving host (default: localhost)" in flat
    assert "--protocol {grpc,rest} grpc (port 8500) or rest (JSON over HTTP, port 8501) (default: grpc)" in flat
    assert ("exit status: 0 done; 1 the server answered with an error; 2 bad flags or unreadable images; 3 no "
            "answer from the server (nothing listens there, or it timed out).") in flat
