"""One Ray Train worker per rank: engines, checkpoints, the stability probe and guard, the meter,
and the `Worker` that runs restore -> step -> periodic tasks."""
