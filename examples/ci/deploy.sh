#!/usr/bin/env bash
# Deploy from CI with deploy-kit: the SSH key and the hosts' known_hosts come from the CI's
# secrets, never from the runner's ~/.ssh, and no host key is ever accepted blindly (deploy-kit
# refuses unknown and changed keys). The exit code fails the job:
#   0 deployed and verified        3 a preflight check failed, nothing changed
#   4 another deploy holds the lock 5 the deploy failed, every host is back where it was
#   6 the deploy failed and so did the rollback: act now
#   7 a host could not be reached  2 bad configuration or flags   9 the release could not be made
#
# Needs (as environment variables, from the CI's secret store):
#   DEPLOY_SSH_KEY      the private key of the deploy user (the whole file)
#   DEPLOY_KNOWN_HOSTS  the hosts' keys, as `ssh-keyscan HOST` printed them once, checked by hand
#   DEPLOY_STAGE        the stage of hosts.toml to deploy (default: staging)
# hosts.toml must point the stage's [stages.NAME.ssh] at the files this script writes:
#   identity_file = ".ci-ssh/id"      known_hosts = ".ci-ssh/known_hosts"
# (relative paths are relative to hosts.toml).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"

: "${DEPLOY_SSH_KEY:?set DEPLOY_SSH_KEY from the CI secret store}"
: "${DEPLOY_KNOWN_HOSTS:?set DEPLOY_KNOWN_HOSTS from the CI secret store}"
stage=${DEPLOY_STAGE:-staging}

umask 077
mkdir -p .ci-ssh
trap 'rm -rf .ci-ssh' EXIT
printf '%s\n' "$DEPLOY_SSH_KEY" > .ci-ssh/id
printf '%s\n' "$DEPLOY_KNOWN_HOSTS" > .ci-ssh/known_hosts

# DEPLOY_KIT: what pip installs, e.g. a wheel in your artifact store or "git+ssh://...deploy-kit.git".
python3 -m pip install --quiet "${DEPLOY_KIT:-deploy-kit}"
export TERM=dumb  # plain lines in the job log
deploy-kit check --stage "$stage"
deploy-kit deploy --stage "$stage" --ref "${GITHUB_SHA:-HEAD}"
