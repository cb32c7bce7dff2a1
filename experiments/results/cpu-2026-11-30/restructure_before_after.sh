#!/usr/bin/env bash
# Before (HEAD before the restructuring, /tmp/before) and after (this tree), interleaved.
set -u
PY=/work/main/.venv/bin/python
OUT=/tmp/bench
run() {  # $1 = before|after, $2 = tag, rest = module args
  local side=$1 tag=$2; shift 2
  local dir=/work/main; [ "$side" = before ] && dir=/tmp/before
  (cd $dir && PYTHONPATH=$dir $PY "$@" > $OUT/$side-$tag.log 2>&1; echo "$side $tag exit $?")
}
date -u
for i in 1 2; do
  run before tt$i -m benchmarks.train_throughput --threads 2 --repeats 3 --json $OUT/before-tt$i.json
  run after tt$i -m benchmarks.train_throughput --threads 2 --repeats 3 --json $OUT/after-tt$i.json
done
for i in 1 2; do
  run before pc$i -m benchmarks.penalty_cost --rounds 3 --steps 16 --threads 1 --json $OUT/before-pc$i.json
  run after pc$i -m benchmarks.penalty_cost --rounds 3 --steps 16 --threads 1 --json $OUT/after-pc$i.json
done
date -u
