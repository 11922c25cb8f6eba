"""Clients for a model served by TF Serving, over REST (JSON) and gRPC.

The model is the one `nfnet_keras.export` writes: signature `serving_default`,
input `image` (uint8 `[batch, height, width, 3]`, raw pixels: `[batch, 32, 32,
3]` for CIFAR-10), outputs `probabilities` (float32 `[batch, classes]`) and
`class_id` (int64 `[batch]`). The contract follows the model: the client sends
images of `--image-size` (default 32) and names the classes with the export's
`class_names.txt` (`--class-names`; without it, CIFAR-10's names for 10
classes, else the class ids). TF Serving tells neither.

REST, row format (`POST http://HOST:8501/v1/models/NAME:predict`):

    request:  {"signature_name": "serving_default",
               "instances": [{"image": [[[r, g, b], ... width], ... height]}, ...]}
    response: {"predictions": [{"probabilities": [p0, ..., p9], "class_id": 3}, ...]}

gRPC (`HOST:8500`, `tensorflow.serving.PredictionService/Predict`): a
`PredictRequest` with `inputs["image"]` a uint8 TensorProto.

Usage:
    python -m nfnet_keras.serving --model-name nfnet [--protocol rest] cat.png ship.png
    python -m nfnet_keras.serving --model-name nfnet --cifar-test 8
    python -m nfnet_keras.serving --model-name pets --image-size 64 --class-names saved_models/pets/1 cat.png
"""

import argparse
import dataclasses
import json
import os
import sys
import urllib.error
import urllib.request

import grpc
import numpy as np

from nfnet_keras import exits
from nfnet_keras.console import prog
from nfnet_keras.contract import (
    CLASS_ID,
    CLASS_NAMES,
    CLASS_NAMES_ASSET,
    IMAGE_SHAPE,
    INPUT,
    PROBABILITIES,
    SIGNATURE,
    InputError,
    check_images,
    default_class_names,
    read_class_names_file,
)

REST_PORT = 8501
GRPC_PORT = 8500
# A batch of 256 CIFAR images is 786 KB; allow large batches both ways.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ServingError(RuntimeError):
    """The server answered with an error (the message is the server's)."""


class ServerUnreachable(ServingError):
    """No answer came: nothing listens at the address, or the server did not answer in time."""


# gRPC statuses that mean no server answered (the client could not connect, or gave up waiting).
_NO_ANSWER_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclasses.dataclass
class Prediction:
    """One image's prediction.

    Attributes:
        class_id: int. The predicted class.
        class_name: str. Its name.
        probability: float. Its probability.
        probabilities: float32 array `(num_classes,)`, in class-id order.
    """

    class_id: int
    class_name: str
    probability: float
    probabilities: np.ndarray


def as_image_batch(images, image_shape=IMAGE_SHAPE):
    """Returns `images` as a uint8 `(batch, height, width, 3)` array; one image gets a batch axis.

    Args:
        images: array-like. Raw RGB pixels, 0-255.
        image_shape: tuple. The served model's `(height, width, 3)`; a `None`
            size takes any (the server checks it). Defaults to `IMAGE_SHAPE`
            (CIFAR-10's 32 x 32).

    Raises:
        InputError (a ValueError): not uint8 (the server normalises raw 0-255
            pixels itself), or a wrong shape.
    """
    return check_images(images, "images", allow_single=True, shape=image_shape)


def _predictions(probabilities, class_ids, class_names):
    probabilities = np.asarray(probabilities, np.float32)
    class_ids = np.asarray(class_ids, np.int64).reshape(-1)
    if class_names is None and probabilities.ndim == 2:
        class_names = default_class_names(probabilities.shape[1])
    if probabilities.ndim != 2 or probabilities.shape[1] != len(class_names):
        raise ServingError(
            f"expected probabilities of shape (batch, {len(class_names)}), got {probabilities.shape}: one per "
            f"class name; name the served model's classes with its export's {CLASS_NAMES_ASSET} (--class-names)."
        )
    if len(class_ids) != len(probabilities):
        raise ServingError(f"got {len(class_ids)} class ids for {len(probabilities)} images.")
    if len(class_ids) and (class_ids.min() < 0 or class_ids.max() >= len(class_names)):
        raise ServingError(f"got class ids {class_ids.tolist()} for {len(class_names)} classes.")
    return [
        Prediction(int(c), class_names[int(c)], float(p[int(c)]), p)
        for c, p in zip(class_ids, probabilities)
    ]


def read_class_names(path):
    """Reads the class names shipped with an export, in class-id order.

    Args:
        path: str. The export's `class_names.txt`, or its version folder
            (`assets/class_names.txt` of a SavedModel, `class_names.txt` of
            the other formats).

    Raises:
        InputError: no such file, or it names no class.
    """
    candidates = ([os.path.join(path, "assets", CLASS_NAMES_ASSET), os.path.join(path, CLASS_NAMES_ASSET)]
                  if os.path.isdir(path) else [path])
    names = next((n for n in map(read_class_names_file, candidates) if n is not None), None)
    if names is None:
        problem = (f"holds neither assets/{CLASS_NAMES_ASSET} nor {CLASS_NAMES_ASSET}" if os.path.isdir(path)
                   else "no such file")
        raise InputError(f"--class-names {path}: {problem}; pass the export's {CLASS_NAMES_ASSET} or its version "
                         "folder (e.g. saved_models/nfnet/1).")
    names = tuple(name for name in names if name.strip())
    if not names:
        raise InputError(f"--class-names {path} names no class; it should hold one class name per line.")
    return names


# === REST ===


def rest_url(model_name, host="localhost", port=REST_PORT, version=None):
    """The REST predict URL: `http://HOST:PORT/v1/models/NAME[/versions/N]:predict`."""
    version_part = "" if version is None else f"/versions/{int(version)}"
    return f"http://{host}:{port}/v1/models/{model_name}{version_part}:predict"


def rest_request(images, signature_name=SIGNATURE, image_shape=IMAGE_SHAPE):
    """Returns the REST predict body (a dict; `json.dumps` it) in row format, for a model of `image_shape`."""
    images = as_image_batch(images, image_shape)
    return {
        "signature_name": signature_name,
        "instances": [{INPUT: image.tolist()} for image in images],
    }


def parse_rest_response(body, class_names=CLASS_NAMES):
    """Parses a REST predict response (str, bytes or dict) into `Prediction`s.

    Accepts the row format (`predictions`, the answer to `instances`) and the
    columnar one (`outputs`, the answer to `inputs`). `class_names` must name
    every class the model returns a probability for; `None` takes
    `default_class_names` of their number.

    Raises:
        ServingError: the body is an error (`{"error": ...}`) or not a prediction.
    """
    if isinstance(body, (str, bytes)):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as e:
            raise ServingError(f"the server's answer is not JSON ({e}).") from e
    if not isinstance(body, dict):
        raise ServingError(f"expected a JSON object, got {type(body).__name__}.")
    if "error" in body:
        raise ServingError(str(body["error"]))
    if "predictions" in body:
        rows = body["predictions"]
        try:
            probabilities = [row[PROBABILITIES] for row in rows]
            class_ids = [row[CLASS_ID] for row in rows]
        except (TypeError, KeyError) as e:
            raise ServingError(
                f"a prediction lacks {e}; expected 'probabilities' and 'class_id' in each."
            ) from e
    elif "outputs" in body and isinstance(body["outputs"], dict):
        probabilities = body["outputs"].get(PROBABILITIES)
        class_ids = body["outputs"].get(CLASS_ID)
        if probabilities is None or class_ids is None:
            raise ServingError("expected outputs 'probabilities' and 'class_id'.")
    else:
        raise ServingError(f"expected 'predictions' or 'outputs', got keys {sorted(body)}.")
    return _predictions(probabilities, class_ids, class_names)


def predict_rest(url, images, signature_name=SIGNATURE, class_names=CLASS_NAMES, timeout=30.0,
                 image_shape=IMAGE_SHAPE):
    """POSTs `images` to a REST predict `url` (see `rest_url`); returns `Prediction`s.

    `class_names` name the served model's classes (`None`: `default_class_names`
    of their number) and `image_shape` is its `(height, width, 3)`: the images
    must have it.
    """
    data = json.dumps(rest_request(images, signature_name, image_shape)).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:  # TF Serving puts the reason in {"error": ...}
        text = e.read().decode(errors="replace")
        try:
            reason = json.loads(text).get("error", text)
        except (json.JSONDecodeError, AttributeError):
            reason = text
        raise ServingError(f"HTTP {e.code} from {url}: {reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise ServerUnreachable(f"cannot reach {url} ({getattr(e, 'reason', e)}); is the server up?") from e
    return _one_per_image(parse_rest_response(body, class_names), images, image_shape)


# === gRPC ===


def grpc_request(images, model_name, signature_name=SIGNATURE, version=None, image_shape=IMAGE_SHAPE):
    """Returns a `tensorflow.serving.PredictRequest` for `images`, for a model of `image_shape`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    images = as_image_batch(images, image_shape)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs[INPUT].CopyFrom(tf.make_tensor_proto(images, dtype=tf.uint8))
    return request


def parse_grpc_response(response, class_names=CLASS_NAMES):
    """Parses a `PredictResponse` into `Prediction`s."""
    import tensorflow as tf

    missing = {PROBABILITIES, CLASS_ID} - set(response.outputs)
    if missing:
        raise ServingError(
            f"the response lacks output(s) {sorted(missing)}; got {sorted(response.outputs)}."
        )
    return _predictions(
        tf.make_ndarray(response.outputs[PROBABILITIES]),
        tf.make_ndarray(response.outputs[CLASS_ID]),
        class_names,
    )


def predict_grpc(
    target,
    images,
    model_name,
    signature_name=SIGNATURE,
    version=None,
    class_names=CLASS_NAMES,
    timeout=30.0,
    image_shape=IMAGE_SHAPE,
):
    """Calls `PredictionService/Predict` at `target` (`"host:8500"`); returns `Prediction`s.

    `class_names` and `image_shape` are the served model's, as `predict_rest`'s.

    Raises:
        ServingError: the call failed; the message holds the gRPC status and details.
            `ServerUnreachable` (a `ServingError`) for UNAVAILABLE and DEADLINE_EXCEEDED.
    """
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    request = grpc_request(images, model_name, signature_name, version, image_shape)
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            error = ServerUnreachable if e.code() in _NO_ANSWER_CODES else ServingError
            raise error(f"{e.code().name} from {target}: {e.details()}") from e
    return _one_per_image(parse_grpc_response(response, class_names), images, image_shape)


def _one_per_image(predictions, images, image_shape):
    sent = len(as_image_batch(images, image_shape))
    if len(predictions) != sent:
        raise ServingError(f"the server returned {len(predictions)} predictions for {sent} images.")
    return predictions


# === Command line ===


def read_inputs(paths, image_shape=IMAGE_SHAPE):
    """Reads the command line's image arguments: `.npy` arrays, image files, folders of images.

    Args:
        paths: list of str. The arguments.
        image_shape: tuple. The served model's `(height, width, 3)`: image
            files are resized to it, arrays must have it. Defaults to
            `IMAGE_SHAPE` (CIFAR-10's 32 x 32).

    Returns:
        `(labels, images)`: one label per image, in order (`file.npy[i]` for
        row i of an array, the path of an image file, `folder/name` for a file
        of a folder) and a uint8 array N x height x width x 3.

    Raises:
        InputError: a path that cannot be read, an array of another image
            size, or an array with no images.
    """
    from nfnet_keras.inference import read_images

    labels, batches = [], []
    for path in paths:
        names, images = read_images(path, flag="", image_shape=image_shape)
        if len(images) == 0:
            raise InputError(f"{path} holds no images (an empty array); give at least one.")
        if path.endswith(".npy"):
            labels += [f"{path}[{name}]" for name in names]
        elif os.path.isdir(path):
            labels += [os.path.join(path, name) for name in names]
        else:
            labels += [path]
        batches.append(images)
    return labels, np.concatenate(batches)


def _labelled_images(parser, args, image_shape):
    """`(labels, images)` of the command line: `--cifar-test N` or the image arguments; a bad one exits with 2."""
    if args.cifar_test is None:
        missing = [p for p in args.images if not os.path.exists(p)]
        if missing:
            parser.error(f"no such image file(s): {', '.join(missing)}.")
        try:
            return read_inputs(args.images, image_shape)
        except InputError as e:
            parser.error(str(e))
    if args.cifar_test < 1:
        parser.error(f"--cifar-test must be >= 1, got {args.cifar_test}.")
    if image_shape != IMAGE_SHAPE:
        parser.error(f"--cifar-test sends CIFAR-10's 32 x 32 test images, not --image-size {args.image_size}; "
                     "send image files instead (resized to the model's size).")
    from nfnet_keras.data import DataError, load_cifar10

    try:
        (_, _), (x_test, y_test) = load_cifar10(test_only=True)
    except DataError as e:
        parser.error(str(e))
    labels = [f"test[{i}] ({CLASS_NAMES[y]})" for i, y in enumerate(y_test[: args.cifar_test])]
    return labels, x_test[: args.cifar_test]


def main(argv=None):
    """Classifies images with a served model; returns the exit status.

    Exit statuses: 0 done; 1 the server answered with an error (or with
    something that is not a prediction); 2 bad flags, or images or data that
    cannot be read; 3 no answer (nothing listens at the address, or no answer
    within the timeout).
    """
    parser = argparse.ArgumentParser(
        prog=prog("nfnet_keras.serving"),
        description="Classify images with a model served by TF Serving (REST or gRPC).",
        epilog="exit status: 0 done; 1 the server answered with an error; 2 bad flags or unreadable images; "
        "3 no answer from the server (nothing listens there, or it timed out).",
    )
    parser.add_argument("images", nargs="*",
                        help="image files (resized to --image-size if needed), folders of them, or .npy uint8 "
                        "arrays N x S x S x 3 of that size")
    parser.add_argument("--cifar-test", type=int, metavar="N",
                        help="send the first N CIFAR-10 test images (a 32 x 32 model)")
    parser.add_argument("--image-size", type=int, default=IMAGE_SHAPE[0], metavar="S",
                        help="the served model's image size S x S, as fit's --image-size (default: %(default)s, "
                        "CIFAR-10's)")
    parser.add_argument("--class-names", metavar="PATH",
                        help="the served export's class_names.txt, or its version folder (saved_models/NAME/VERSION)"
                        " (default: CIFAR-10's names for 10 classes, else the class ids)")
    parser.add_argument("--model-name", required=True, help="the name the model is served under")
    parser.add_argument("--version", type=int, help="a model version (default: the latest)")
    parser.add_argument("--host", default="localhost", help="the TF Serving host (default: localhost)")
    parser.add_argument("--protocol", choices=("grpc", "rest"), default="grpc",
                        help=f"grpc (port {GRPC_PORT}) or rest (JSON over HTTP, port {REST_PORT}) (default: grpc)")
    parser.add_argument("--port", type=int, help=f"default: {GRPC_PORT} (gRPC), {REST_PORT} (REST)")
    args = parser.parse_args(argv)
    if bool(args.images) == (args.cifar_test is not None):
        parser.error("pass image files or --cifar-test N (one of them).")
    if args.image_size < 1:
        parser.error(f"--image-size must be >= 1 (pixels), got {args.image_size}.")
    image_shape = (args.image_size, args.image_size, 3)
    class_names = None
    if args.class_names is not None:
        try:
            class_names = read_class_names(args.class_names)
        except InputError as e:
            parser.error(str(e))
    labels, images = _labelled_images(parser, args, image_shape)
    try:
        if args.protocol == "rest":
            url = rest_url(args.model_name, args.host, args.port or REST_PORT, args.version)
            predictions = predict_rest(url, images, class_names=class_names, image_shape=image_shape)
        else:
            target = f"{args.host}:{args.port or GRPC_PORT}"
            predictions = predict_grpc(target, images, args.model_name, version=args.version,
                                       class_names=class_names, image_shape=image_shape)
    except ServerUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.NO_ANSWER
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return exits.SERVER_ERROR
    for label, p in zip(labels, predictions, strict=True):
        print(f"{label}: {p.class_name} (p={p.probability:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
