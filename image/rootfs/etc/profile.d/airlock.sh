# airlock: per-sandbox settings (the egress proxy) written at boot by
# airlock-agent prepare, and the desktop's browser for programs that open URLs.
if [ -r /run/airlock/profile.sh ]; then
    . /run/airlock/profile.sh
fi
export BROWSER=/usr/local/bin/airlock-chromium
