"""The mechanism study's bookkeeping: rows, dependencies and the ordering checks."""

from instance_loss_jax.cli import ablate


def fake(values):
  return [dict(i2t_r1=v, i2t_r10=v, t2i_r1=v, t2i_r10=v, S=1 - v / 100) for v in values]


def test_rows_depend_only_on_earlier_stage1_rows():
  names = [r.name for r in ablate.ROWS]
  assert len(set(names)) == len(names)
  for i, row in enumerate(ablate.ROWS):
    if row.init_from:
      assert row.stage == 2 and row.init_from in names[:i]
    else:
      assert row.stage == 1


def test_orderings_say_plainly_whether_each_claim_holds():
  results = {r.name: fake([50, 52, 48]) for r in ablate.ROWS}
  results["s1_rank"] = fake([10, 11, 9])  # instance >> ranking in Stage I: holds, clearly
  results["s2_full"] = fake([49, 51, 50])  # full vs instance: does not hold, within spread
  lines = ablate.orderings(results)
  first = [l for l in lines if "instance loss beats ranking loss" in l][0]
  assert "holds, clearly" in first and "50 ± 1.6 vs 10 ± 0.82" in first
  full = [l for l in lines if "full model beats instance loss only" in l][0]
  assert "does NOT hold, within the spread" in full
  s_line = [l for l in lines if l.startswith("- S: full model")][0]
  assert "(S)" in s_line
