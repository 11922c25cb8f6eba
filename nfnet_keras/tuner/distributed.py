"""The grid's distributed mode: KerasTuner's chief oracle service, with bounded waits.

The chief serves its oracle over gRPC (`keras_tuner.src.distribute.oracle_chief`);
each worker replaces its own oracle by KerasTuner's `OracleClient`, which asks
the chief for trials and reports their results. `NFNetGridSearch` keeps that
service and changes three things of it:

- A worker waits at most `timeout` seconds for the chief on every request,
  then raises `ChiefUnreachable` (KerasTuner's client waits up to an hour per
  request: a worker whose chief died hangs that long).
- A worker told `IDLE` (every grid point is taken, some still run) asks again
  after `IDLE_WAIT` seconds (KerasTuner's worker loop asks again at once, a
  busy loop against the chief).
- The chief checks every second whether the search is over (KerasTuner's
  server every 20 s) and reports an address it cannot listen on as
  `ChiefCannotListen` (KerasTuner's server loop would then serve nothing,
  forever).

Roles and the local launcher are in `nfnet_keras.tuner.launch`.
"""

import time

from keras_tuner.src import errors as kt_errors
from keras_tuner.src.engine import trial as trial_module

from nfnet_keras.tuner import launch

IDLE_WAIT = 1.0  # seconds a worker waits before asking again when every grid point is taken
POLL = 1.0  # seconds between the chief's checks whether the search is over


class ChiefUnreachable(kt_errors.FatalError):
    """A worker got no answer from the chief in time (fatal: KerasTuner does not record it as the trial's failure)."""


class ChiefCannotListen(RuntimeError):
    """The chief cannot listen on `KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT`."""


class _BoundedStub:
    """The oracle service's stub with every request's deadline set to `timeout` seconds."""

    def __init__(self, stub, timeout):
        self._stub, self._timeout = stub, timeout

    def __getattr__(self, name):
        import grpc

        method = getattr(self._stub, name)

        def call(request, **kwargs):
            kwargs["timeout"] = self._timeout
            try:
                return method(request, **kwargs)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise ChiefUnreachable(launch.unreachable_message(self._timeout, f"to {name}")) from None
                raise

        return call


def bounded_client(client, timeout):
    """Makes KerasTuner's `OracleClient` give up on the chief after `timeout` s and pace its `IDLE` requests."""
    client.stub = _BoundedStub(client.stub, timeout)
    create_trial = client.create_trial

    def paced_create_trial(tuner_id):
        trial = create_trial(tuner_id)
        if trial.status == trial_module.TrialStatus.IDLE:
            time.sleep(IDLE_WAIT)
        return trial

    client.create_trial = paced_create_trial
    return client


def serve(oracle):
    """Serves `oracle` to the workers with KerasTuner's servicer until the search is over.

    Over: a worker was told STOPPED and every worker that asked for trials was told so too
    (KerasTuner's rule, `oracle_chief.exit_chief`).

    Raises:
        ChiefCannotListen: the address is in use or not one of this host's.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        server.add_insecure_port(launch.address())
    except RuntimeError:
        raise ChiefCannotListen(
            f"the chief cannot listen on {launch.address()} ({launch.ORACLE_IP}:{launch.ORACLE_PORT}): the port is "
            "in use or the IP is not an address of this host; choose another port, or 0.0.0.0 to listen on every "
            "interface.") from None
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(POLL)
    finally:
        server.stop(grace=1)
