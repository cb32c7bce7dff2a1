#!/usr/bin/env bash
set -u
PY=/work/main/.venv/bin/python
OUT=/tmp/bench
run() { local side=$1 tag=$2; shift 2; local dir=/work/main; [ "$side" = before ] && dir=/tmp/before
  (cd $dir && PYTHONPATH=$dir $PY "$@" > $OUT/$side-$tag.log 2>&1; echo "$side $tag exit $?"); }
date -u
for i in 3 4 5; do
  run after tt$i -m benchmarks.train_throughput --threads 2 --repeats 3 --json $OUT/after-tt$i.json
  run before tt$i -m benchmarks.train_throughput --threads 2 --repeats 3 --json $OUT/before-tt$i.json
done
date -u
