#!/usr/bin/env bash
# Deploy from CI with deploy-kit. Copy this file into your project's repository (for example
# as ci/deploy.sh, executable) and call it from the CI job (see github-actions.yml here).
#
# The SSH key and the hosts' known_hosts come from the CI's secrets, never from the runner's
# ~/.ssh, and no host key is ever accepted blindly (deploy-kit refuses unknown and changed keys).
# The exit code fails the job:
#   0 deployed and verified        3 a preflight check failed, nothing changed
#   4 another deploy holds the lock 5 the deploy failed, every host is back where it was
#   6 the deploy failed and so did the rollback: act now
#   7 a host could not be reached  2 bad configuration or flags   9 the release could not be made
#
# Needs (as environment variables; the secrets from the CI's secret store):
#   DEPLOY_KIT          what pip installs: a pinned git URL
#                       (git+https://github.com/ACME/deploy-kit.git@<full commit sha>) or the path
#                       of a wheel you built (`pip wheel --no-deps /path/to/deploy-kit`). Required:
#                       deploy-kit is not on a public package index, and a bare name there could be
#                       anyone's package, installed next to your deploy key.
#   DEPLOY_SSH_KEY      the private key of the deploy user (the whole file)
#   DEPLOY_KNOWN_HOSTS  the hosts' keys, as `ssh-keyscan HOST` printed them once, checked by hand
#   DEPLOY_STAGE        the CI-only stage of hosts.toml to deploy (below)
#   DEPLOY_DIR          the directory holding hosts.toml, from the repository's top (default: .)
#
# The stage CI deploys is a CI-only stage of hosts.toml (the same hosts as the stage your team
# deploys from laptops), whose SSH settings point at the files this script writes next to
# hosts.toml (relative paths there are relative to hosts.toml's directory):
#   [stages.staging-ci]             # hosts and roles as in [stages.staging]
#   [stages.staging-ci.ssh]
#   identity_file = ".ci-ssh/id"
#   known_hosts = ".ci-ssh/known_hosts"
# so deploys from laptops keep their own keys, and the CI's key is written and used for this job only.
set -euo pipefail

: "${DEPLOY_KIT:?set DEPLOY_KIT to a pinned wheel or git URL (git+https://...deploy-kit.git@COMMIT_SHA or path/to/deploy_kit-VERSION-py3-none-any.whl)}"
: "${DEPLOY_SSH_KEY:?set DEPLOY_SSH_KEY from the CI secret store}"
: "${DEPLOY_KNOWN_HOSTS:?set DEPLOY_KNOWN_HOSTS from the CI secret store}"
: "${DEPLOY_STAGE:?set DEPLOY_STAGE to the CI-only stage of hosts.toml (see the top of this script)}"
if ! [[ $DEPLOY_KIT =~ ^git\+[a-z]+://.+@[0-9a-f]{40}$ || $DEPLOY_KIT =~ \.whl$ ]]; then
  echo "DEPLOY_KIT=$DEPLOY_KIT is neither a git URL pinned to a full commit sha (...git@COMMIT_SHA)" \
       "nor a wheel: set it to one of them (a bare name installs whatever a package index holds)" >&2
  exit 2
fi
if [[ $DEPLOY_KIT == *.whl && $DEPLOY_KIT != *://* ]]; then  # a wheel here: found before the cd below
  [[ -f $DEPLOY_KIT ]] || { echo "DEPLOY_KIT=$DEPLOY_KIT: no such wheel file" >&2; exit 2; }
  DEPLOY_KIT=$(realpath "$DEPLOY_KIT")
fi

cd "$(git rev-parse --show-toplevel)/${DEPLOY_DIR:-.}"
umask 077
tools=$(mktemp -d)
mkdir -p .ci-ssh
trap 'rm -rf .ci-ssh "$tools"' EXIT
printf '%s\n' "$DEPLOY_SSH_KEY" > .ci-ssh/id
printf '%s\n' "$DEPLOY_KNOWN_HOSTS" > .ci-ssh/known_hosts

python3 -m venv "$tools/venv"  # deploy-kit in a virtualenv of its own, gone with the job
"$tools/venv/bin/pip" install --quiet --disable-pip-version-check "$DEPLOY_KIT"
export PATH="$tools/venv/bin:$PATH" TERM=dumb  # plain lines in the job log
deploy-kit check --stage "$DEPLOY_STAGE"
deploy-kit deploy --stage "$DEPLOY_STAGE" --ref "${GITHUB_SHA:-HEAD}"
