"""The mechanism study's bookkeeping: rows, dependencies and the ordering checks."""

from instance_loss_jax.cli import ablate


import pytest


def fake(values):
  return [dict(i2t_r1=v, i2t_r10=v, t2i_r1=v, t2i_r10=v, rsum=4 * v, S=1 - v / 100)
          for v in values]


@pytest.mark.parametrize("study", sorted(ablate.STUDIES))
def test_rows_depend_only_on_earlier_stage1_rows(study):
  rows = ablate.STUDIES[study]
  names = [r.name for r in rows]
  assert len(set(names)) == len(names)
  for i, row in enumerate(rows):
    if row.init_from:
      assert row.stage == 2 and row.init_from in names[:i]
    else:
      assert row.stage == 1
    if row.backbone_from:  # its frozen backbone is read from that run's checkpoint
      assert row.backbone_from in names[:i] and rows[names.index(row.backbone_from)].stage == 1


def test_the_losses_study_reports_every_row_and_its_claims(tmp_path):
  results = {r.name: fake([50, 52, 48]) for r in ablate.ROWS_LOSSES}
  results["s1_k_few"] = fake([30, 31, 29])
  path = ablate.write_losses_report(str(tmp_path), [0, 1, 2], results, "cmd", 60.0)
  text = open(path, encoding="utf-8").read()
  for row in ablate.ROWS_LOSSES:
    assert f"| {row.label} |" in text
  assert "| 52.2 | 37.2 |" in text  # Table 5's instance-loss row, MSCOCO
  line = [l for l in text.splitlines() if "the larger K beats the smaller" in l][0]
  assert "holds, clearly" in line and "(i2t_r1)" in line


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
