#!/usr/bin/env bash
# One device call (twenty-sixth session): build B (the tree) with test_cuda, the
# windowed-attention tests, then A (the tree with lab/cuda/ab.patch reversed)
# and Llama / Gemma window-1024 decode at 128K, A and B twice each.
source lab/cuda/common.sh
lab_configure && lab_build tq test_cuda || exit 1
cp $B/tools/tq/tq /tmp/tq_B; echo "B built $(( $(date +%s) - t0 )) s"
timeout 60 $B/tests/test_cuda --gtest_filter='CudaAttentionTc.DirectOutputIsTheMergedSplit:CudaWindow.*:CudaGraph.CapturedAttendStaysExactAsSequencesGrow:CudaAttentionTc.MatchesReferenceAndCpu' 2>&1 | grep -E "^\[  (PASSED|FAILED)|FAILED|Failure" | head -8
patch -R -p1 < lab/cuda/ab.patch >/dev/null && lab_build tq && cp $B/tools/tq/tq /tmp/tq_A; patch -p1 < lab/cuda/ab.patch >/dev/null
echo "A built $(( $(date +%s) - t0 )) s"
for v in A B A B; do timeout 60 /tmp/tq_$v gpu-bench --shape llama,gemma --batch 1,8 --context 131072 --preset turbo4,paper_mse --window 1024 --no-append --runs 20 --json-file /tmp/w_$v.json >/dev/null 2>&1 || echo "$v failed"; python3 -c "
import json;r=json.load(open('/tmp/w_$v.json'))
print('$v',' '.join('%s/%s/%d=%.4f'%(x['shape'][0],x['preset'][:5],x['batch'],x['ms']) for x in r if x.get('kind')=='attend' and x['preset']!='dense_bf16'))"; done
echo "total $(( $(date +%s) - t0 )) s"
