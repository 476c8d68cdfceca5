// Sharing the desktop (owner only): the Share panel makes a link a second
// person opens without an account, read-only unless "let them type" is
// ticked, lists the live links (their secrets are shown once, when made),
// switches input, and revokes. The server enforces what a link's holder may
// do (docs/security.md, "View shares"); this is only its front.

import { api } from '/api.js';

const $ = (id) => document.getElementById(id);
const sharesPath = (id) => `/sandboxes/${encodeURIComponent(id)}/shares`;

export const createShare = (id, ttlS, input) => api('POST', sharesPath(id), { ttl_s: ttlS, input });
export const listShares = async (id) => ((await api('GET', sharesPath(id))) || {}).shares || [];
export const setShareInput = (id, shareId, input) =>
  api('PATCH', `${sharesPath(id)}/${encodeURIComponent(shareId)}`, { input });
export const revokeShare = (id, shareId) => api('DELETE', `${sharesPath(id)}/${encodeURIComponent(shareId)}`);

export class ViewerShare {
  constructor(id) {
    this.id = id;
    this.button = $('share-button');
    this.panel = $('share-panel');
    this.ttl = $('share-ttl');
    this.input = $('share-input');
    this.create = $('share-create');
    this.url = $('share-url');
    this.list = $('share-list');
    this.note = $('share-note');
    this.button.hidden = false;
    this.button.addEventListener('click', () => this.toggle());
    this.create.addEventListener('click', () => this.make());
    this.panel.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape') this.toggle(false);
    });
  }

  toggle(open = this.panel.hidden) {
    this.panel.hidden = !open;
    this.button.setAttribute('aria-expanded', String(open));
    if (open) this.refresh();
  }

  say(text, error = false) {
    this.note.textContent = text;
    this.note.dataset.error = String(error);
  }

  async make() {
    try {
      const made = await createShare(this.id, Number(this.ttl.value), this.input.checked);
      this.url.value = new URL(made.url, location.origin).href;
      this.url.hidden = false;
      this.url.select();
      this.say(`Link made, good until ${new Date(made.expires_at).toLocaleString()}. It is shown only now.`);
      this.refresh();
    } catch (err) {
      this.say(`Could not make a link: ${err.message}`, true);
    }
  }

  async refresh() {
    let shares;
    try {
      shares = await listShares(this.id);
    } catch (err) {
      this.say(`Could not list links: ${err.message}`, true);
      return;
    }
    this.list.replaceChildren(...shares.map((s) => {
      const li = document.createElement('li');
      li.dataset.share = s.id;
      const label = document.createElement('span');
      label.textContent = `${s.id}, until ${new Date(s.expires_at).toLocaleTimeString()}`;
      const typing = document.createElement('label');
      const box = document.createElement('input');
      box.type = 'checkbox';
      box.checked = s.input;
      box.addEventListener('change', async () => {
        try {
          await setShareInput(this.id, s.id, box.checked);
        } catch (err) {
          box.checked = !box.checked;
          this.say(err.message, true);
        }
      });
      typing.append(box, ' may type');
      const revoke = document.createElement('button');
      revoke.type = 'button';
      revoke.textContent = 'Revoke';
      revoke.addEventListener('click', async () => {
        try {
          await revokeShare(this.id, s.id);
          this.say(`Revoked ${s.id}; its viewers close.`);
        } catch (err) {
          this.say(err.message, true);
        }
        this.refresh();
      });
      li.append(label, ' ', typing, ' ', revoke);
      return li;
    }));
  }
}
