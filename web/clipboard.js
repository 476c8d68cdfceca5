// The viewer's clipboard, the same on both paths: text copied in the sandbox
// arrives here (WebRTC: the signalling socket; noVNC: RFB ServerCutText), and
// text from this computer goes to the sandbox's clipboard (WebRTC: the input
// data channel; noVNC: RFB ClientCutText), where Ctrl+V in Chromium and
// Shift+Insert in the terminal paste it.
//
// Browsers hand out the local clipboard only on a user's gesture, so:
//   - Ctrl+V (or Shift+Insert) in the viewer sends what the browser's paste
//     event carries, then the key (webrtc.js holds the key for it);
//   - when the tab gets focus and the page may already read the clipboard
//     (the user allowed it once), the local text goes over by itself;
//   - the Clipboard panel always works: type or paste into it, press Send;
//     text from the sandbox shows there, with a Copy button.
// Text from the sandbox is written to the local clipboard only while this tab
// has focus (the browser refuses it otherwise); then the panel says so. What
// the sandbox's clipboard held when the viewer connected is only shown: it
// must not replace what the user copied here to paste into the sandbox.
//
// Text only, at most MAX_BYTES of UTF-8 (the guest's bound); more is refused
// here with a message, before anything is sent.

export const MAX_BYTES = 1024 * 1024;
// Text from the sandbox this soon after connecting is what it held before.
const SETTLE_MS = 2000;

const $ = (id) => document.getElementById(id);

export class ViewerClipboard {
  constructor() {
    this.button = $('clipboard-button');
    this.panel = $('clipboard-panel');
    this.text = $('clipboard-text');
    this.sendButton = $('clipboard-send');
    this.copyButton = $('clipboard-copy');
    this.note = $('clipboard-note');
    // Where text for the sandbox goes: set by the path in use.
    this.sink = null;
    // Text from the sandbox, last seen; text sent to it, last.
    this.remote = '';
    this.sent = '';
    this.error = '';
    this.button.addEventListener('click', () => this.toggle());
    this.sendButton.addEventListener('click', () => this.send(this.text.value, 'panel'));
    this.copyButton.addEventListener('click', () => this.copyOut());
    this.panel.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape') this.toggle(false);
    });
    window.addEventListener('focus', () => this.pullOnFocus());
  }

  toggle(open = this.panel.hidden) {
    this.panel.hidden = !open;
    this.button.setAttribute('aria-expanded', String(open));
    if (open) this.text.focus();
  }

  /** The path in use: a function taking text for the sandbox, or null. */
  attach(sink) {
    this.sink = sink;
    this.attachedAt = sink ? Date.now() : 0;
    this.sendButton.disabled = !sink;
  }

  say(message, isError = false) {
    this.note.textContent = message;
    this.note.dataset.error = String(isError);
    if (isError) this.error = message;
  }

  /** Send text to the sandbox's clipboard; whether it went. */
  send(text, from = 'paste') {
    if (typeof text !== 'string' || text === '') return false;
    const bytes = new TextEncoder().encode(text).length;
    if (bytes > MAX_BYTES) {
      this.say(`Not sent: the text is ${(bytes / 1048576).toFixed(1)} MiB; the sandbox's clipboard takes at most 1 MiB.`, true);
      return false;
    }
    if (!this.sink) {
      this.say('Not sent: the viewer is not connected.', true);
      return false;
    }
    this.sink(text);
    this.sent = text;
    this.error = '';
    this.say(from === 'panel' ? `Sent ${describe(text)} to the sandbox's clipboard.` : `Pasted ${describe(text)}.`);
    return true;
  }

  /** Text copied in the sandbox. */
  async fromSandbox(text) {
    if (typeof text !== 'string' || text === this.remote) return;
    this.remote = text;
    // Do not overwrite what the user is typing into the panel.
    if (document.activeElement !== this.text) this.text.value = text;
    this.copyButton.disabled = false;
    const fresh = this.attachedAt && Date.now() - this.attachedAt >= SETTLE_MS;
    if (fresh && document.hasFocus() && navigator.clipboard && navigator.clipboard.writeText) {
      try {
        await navigator.clipboard.writeText(text);
        this.sent = text; // already on both sides: not worth sending back
        this.say(`Copied in the sandbox: ${describe(text)}, now on this computer's clipboard too.`);
        return;
      } catch {
        // refused: the Copy button does it on a click
      }
    }
    this.say(`Copied in the sandbox: ${describe(text)}. Press Copy to put it on this computer's clipboard.`);
  }

  async copyOut() {
    const text = this.remote || this.text.value;
    try {
      await navigator.clipboard.writeText(text);
      this.say(`On this computer's clipboard: ${describe(text)}.`);
    } catch {
      // Without the Clipboard API (a page not served over HTTPS): select it.
      this.text.value = text;
      this.text.select();
      const ok = document.execCommand && document.execCommand('copy');
      this.say(ok ? `On this computer's clipboard: ${describe(text)}.` : 'The browser refused; the text is selected: press Ctrl+C.', !ok);
    }
  }

  /** On focus, send the local clipboard if the browser lets us read it
   *  without asking (the user allowed it before). */
  async pullOnFocus() {
    if (!this.sink || !navigator.permissions || !navigator.clipboard || !navigator.clipboard.readText) return;
    try {
      const p = await navigator.permissions.query({ name: 'clipboard-read' });
      if (p.state !== 'granted') return;
      const text = await navigator.clipboard.readText();
      if (text && text !== this.sent && text !== this.remote) this.send(text);
    } catch {
      // no permission API for the clipboard in this browser
    }
  }
}

// "12 characters", never the text itself: it may be a password.
function describe(text) {
  const n = [...text].length;
  return n === 1 ? '1 character' : `${n} characters`;
}
