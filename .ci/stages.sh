# Sourced by .ci/run and .ci/wheel.  `stage NAME COMMAND [ARGS]` runs one stage of CI under
# what is left of CI's time budget (CI_BUDGET_S from the start of .ci/run), and prints how long
# it took and the time so far; a stage that would run past the budget is stopped and fails,
# naming itself, long before CI's hard limit.
: "${CI_BUDGET_S:=2400}"
: "${CI_STARTED:=$(date +%s)}"
export CI_BUDGET_S CI_STARTED

stage() {
  local name=$1 now left started rc=0
  shift
  now=$(date +%s)
  left=$((CI_STARTED + CI_BUDGET_S - now))
  if ((left <= 0)); then
    echo "CI time budget: ${CI_BUDGET_S}s spent before stage '$name'"
    exit 1
  fi
  echo "== stage $name: starts at $((now - CI_STARTED))s, ${left}s of the budget left"
  started=$now
  timeout -k 30 "$left" "$@" || rc=$?
  now=$(date +%s)
  if ((rc == 124 || rc == 137)); then
    echo "CI time budget: stage '$name' was stopped at ${CI_BUDGET_S}s (the budget in .ci/run)"
    exit 1
  fi
  if ((rc != 0)); then
    echo "stage '$name' failed (exit $rc)"
    exit "$rc"
  fi
  echo "== stage $name: $((now - started))s (so far $((now - CI_STARTED))s of ${CI_BUDGET_S}s)"
}
