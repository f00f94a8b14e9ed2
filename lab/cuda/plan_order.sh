#!/usr/bin/env bash
# Twenty-seventh session: is the captured attend's extra time at Llama 32 x 128K
# (graph vs a host-planned call) the order of the timings (power, clocks)? This
# copy of gpu-bench times each row as: device plan (call), graph (device plan),
# host plan (call), graph again, host plan again; printed as "order: ...".
source "$(dirname "$0")/common.sh"
python3 - <<'PY'
p='tools/tq/cmd_gpu_bench.cpp'
s=open(p).read()
old='''      const double ms = time_median([&] { attend(nullptr); }, a_.runs, *flush_);
      if (decode_tc) {'''
new='''      double ms = 0;
      if (decode_tc) {
        cuda::set_decode_split_planning(cuda::SplitPlanning::device);
        const double d1 = time_median([&] { attend(nullptr); }, a_.runs, *flush_);
        cuda::set_decode_split_planning(cuda::SplitPlanning::automatic);
        const double g1 = time_median([&] { graph.launch(); }, a_.runs, *flush_, graph.stream());
        const double h1 = time_median([&] { attend(nullptr); }, a_.runs, *flush_);
        const double g2 = time_median([&] { graph.launch(); }, a_.runs, *flush_, graph.stream());
        const double h2 = time_median([&] { attend(nullptr); }, a_.runs, *flush_);
        std::printf("order: devplan %.4f graph %.4f host %.4f graph %.4f host %.4f\\n", d1, g1, h1, g2, h2);
      }
      ms = time_median([&] { attend(nullptr); }, a_.runs, *flush_);
      if (decode_tc) {'''
assert old in s
open(p,'w').write(s.replace(old,new))
PY
lab_configure && lab_build tq || exit 1
echo "build $(( $(date +%s) - t0 )) s"
for rep in 1 2; do
  "$B/tools/tq/tq" gpu-bench --shape llama --batch 8,32 --context 131072 --preset turbo4,turbo3 --no-append 2>&1 | grep -E "^order|graph"
done
echo "total $(( $(date +%s) - t0 )) s"
