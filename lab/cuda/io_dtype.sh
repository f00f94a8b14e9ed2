#!/usr/bin/env bash
# One device call (after lab/cuda/ab_decode.sh, which leaves B's tq in
# /tmp/tq_B): GpuKvLayer::attend with f32 against bf16 / f16 query and
# output (`tq gpu-bench --io`), the same rows, $ROUNDS rounds alternating;
# prints the smaller round median of each and the ratio to f32. The 16-bit
# rows pay the query's widening kernel and write a 16-bit output.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ROUNDS=${ROUNDS:-2}
TQ=${TQ:-/tmp/tq_B}
read -r -a ARGS <<<"${IO_ARGS:---shape llama,gemma --batch 1,8 --context 32768,131072 --preset turbo4 --no-append --runs 30}"
rm -rf /tmp/io && mkdir -p /tmp/io
for r in $(seq "$ROUNDS"); do
  for io in f32 bf16 f16; do
    timeout 200 "$TQ" gpu-bench "${ARGS[@]}" --io $io --json-file /tmp/io/${io}_$r.json >/dev/null 2>/tmp/io/${io}_$r.err ||
      { echo "$io round $r failed"; tail -3 /tmp/io/${io}_$r.err; }
  done
done
python3 lab/cuda/variant_table.py /tmp/io "$OUT/io.json" f32 bf16 f16
echo "total $(( $(date +%s) - t0 )) s"
